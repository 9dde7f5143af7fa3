"""First-fit packing of causal-LM examples into rows of a fixed length, with segment ids.

Several short examples share one row; `segment_ids` (1, 2, ... per example, 0 = padding) let the
model attend only within an example, `position_ids` restart at 0 for every example, and the
loss mask is 0 on the first token of every example, so no example is ever the target of the one
before it. The loss stays a mean over target tokens, so a packed batch gives the same loss and
gradients as the same examples one per row.

Example:
  >>> arrays, stats = pack([[1, 5, 6], [1, 7]], [[0, 1, 1], [0, 1]], 8, pad_id=0)
  >>> arrays["segment_ids"][0]       # array([1, 1, 1, 2, 2, 0, 0, 0], dtype=int32)
  >>> arrays["position_ids"][0]      # array([0, 1, 2, 0, 1, 0, 0, 0], dtype=int32)
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from doran_jax.errors import DataError

PACKED_KEYS = ("input_ids", "attention_mask", "loss_mask", "segment_ids", "position_ids")


def first_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
  """Example indices per row: each example goes to the first row with room left, in order.

  Deterministic (no randomness; the input order decides).

  Example:
    >>> first_fit([5, 4, 3, 2], 8)
    [[0, 2], [1, 3]]
  """
  lengths = np.asarray(lengths, np.int64)
  if lengths.size and (lengths.min() <= 0 or lengths.max() > capacity):
    raise DataError(f"every example must have 1..{capacity} tokens to be packed; got lengths "
                    f"{int(lengths.min())}..{int(lengths.max())} (truncate to data.max_length "
                    "first).")
  room = np.empty(max(len(lengths), 1), np.int64)   # room left in each open row
  rows: list[list[int]] = []
  for i, n in enumerate(lengths):
    fits = room[:len(rows)] >= n
    r = int(np.argmax(fits)) if len(rows) and fits.any() else len(rows)
    if r == len(rows):
      rows.append([])
      room[r] = capacity
    rows[r].append(i)
    room[r] -= n
  return rows


def pack(ids: Sequence[Sequence[int]], masks: Sequence[Sequence[int]], max_length: int, *,
         pad_id: int) -> tuple[dict[str, np.ndarray], dict]:
  """Packs token lists (each at most max_length) into (rows, max_length) int32 arrays.

  Returns (arrays, stats): arrays are input_ids, attention_mask, loss_mask, segment_ids and
  position_ids; stats has examples, rows, tokens (real tokens) and efficiency (real tokens /
  row tokens).

  Example:
    >>> arrays, stats = pack(ids, masks, 512, pad_id=tokenizer.pad_token_id)
    >>> stats["efficiency"]          # e.g. 0.93
  """
  if len(ids) != len(masks):
    raise DataError(f"pack got {len(ids)} token lists and {len(masks)} loss masks.")
  if not ids:
    raise DataError("nothing to pack: no examples.")
  lengths = [len(x) for x in ids]
  for i, (x, m) in enumerate(zip(ids, masks)):
    if len(m) != len(x):
      raise DataError(f"example {i} has {len(x)} tokens but a loss mask of {len(m)}.")
  rows = first_fit(lengths, max_length)
  shape = (len(rows), max_length)
  out = {"input_ids": np.full(shape, pad_id, np.int32)}
  out.update({k: np.zeros(shape, np.int32) for k in PACKED_KEYS[1:]})
  for r, members in enumerate(rows):
    at = 0
    for segment, i in enumerate(members, 1):
      n = lengths[i]
      span = slice(at, at + n)
      out["input_ids"][r, span] = ids[i]
      out["attention_mask"][r, span] = 1
      out["loss_mask"][r, span] = masks[i]
      # The first token of an example is never a target: the token before it is another example's.
      out["loss_mask"][r, at] = 0
      out["segment_ids"][r, span] = segment
      out["position_ids"][r, span] = np.arange(n)
      at += n
  tokens = int(sum(lengths))
  stats = {"examples": len(ids), "rows": len(rows), "tokens": tokens,
           "efficiency": tokens / float(len(rows) * max_length)}
  return out, stats
