"""What the causal-LM sources (instruction, chat, commonsense) share: JSON(L) files read with line
numbers, over-long examples truncated or dropped (and counted), rows padded or packed.

An example is a token list and a loss mask of the same length (1 on target tokens: the
completion or assistant turns, and their end token). Tasks read `loss_mask[:, 1:]` against the
targets `input_ids[:, 1:]` and divide by the number of target tokens.

Example:
  >>> records = read_records("chats/train.jsonl")      # [(line, record), ...]
  >>> ds = causal_dataset(ids, masks, data_cfg, "train", pad_id=0, records=recs, where=file)
"""

from __future__ import annotations

import json
import os
from typing import Optional, Sequence

import numpy as np
from absl import logging

from doran_jax.data import packing
from doran_jax.data.base import SPLITS, resolve_split
from doran_jax.data.dataset import Dataset
from doran_jax.errors import DataError

EXTENSIONS = (".jsonl", ".json")


def split_file(data_cfg, name: str, source: str) -> str:
  """`{data.path}/{name}.jsonl` or `{name}.json` (exactly one of them must exist).

  Example:
    >>> split_file(default_data_config("chat", path="chats"), "dev", "chat")   # 'chats/dev.jsonl'
  """
  path = data_cfg.get("path", None)
  if not path or not isinstance(path, str):
    raise DataError(f"data source {source!r} needs data.path, a folder holding train.jsonl and "
                    "dev.jsonl (or train.json and dev.json lists).")
  folder = os.path.expanduser(path)
  if not os.path.isdir(folder):
    raise DataError(f"data.path={path!r} is not a folder; data source {source!r} reads "
                    "{path}/{split}.jsonl (or .json).")
  found = [os.path.join(folder, name + ext) for ext in EXTENSIONS
           if os.path.isfile(os.path.join(folder, name + ext))]
  if len(found) > 1:
    raise DataError(f"both {found[0]!r} and {found[1]!r} exist; keep one of them (which split "
                    "file to read would be a guess).")
  if not found:
    present = sorted(f for f in os.listdir(folder) if f.endswith(EXTENSIONS))
    raise DataError(f"no {name}.jsonl or {name}.json in data.path={path!r} (JSON files there: "
                    f"{present}); check data.path and the split name {name!r} "
                    "(data.train_split / data.eval_split).")
  return found[0]


def file_problems(data_cfg, source) -> list[str]:
  """The missing or ambiguous split files of a JSON(L) folder source, read without parsing.

  Example:
    >>> file_problems(default_data_config("chat", path="my_chats"), registry.get("chat"))
  """
  path = data_cfg.get("path", None)
  if not isinstance(path, str) or not os.path.exists(os.path.expanduser(path)):
    return []   # the shared path checks report it
  problems = []
  for split in SPLITS:
    try:
      split_file(data_cfg, resolve_split(data_cfg, split, source.splits), source.name)
    except DataError as e:
      problems.append(str(e))
  return problems


def _line(text: str, offset: int) -> int:
  return text.count("\n", 0, offset) + 1


def _skip_space(text: str, at: int) -> int:
  while at < len(text) and text[at] in " \t\r\n":
    at += 1
  return at


def read_records(file: str) -> list[tuple[int, object]]:
  """(line number, JSON value) per record: one a line (.jsonl) or the items of a JSON list.

  Blank lines are skipped. Bad UTF-8 or JSON is a DataError naming the file and the line.

  Example:
    >>> for line, record in read_records("chats/train.jsonl"): ...
  """
  with open(file, "rb") as f:
    raw = f.read()
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    line = raw.count(b"\n", 0, e.start) + 1
    raise DataError(f"{file}:{line}: not UTF-8 (byte {raw[e.start]:#04x}); save the file as "
                    "UTF-8.") from None
  if text.startswith("\ufeff"):   # a byte-order mark some editors write
    text = text[1:]
  if file.endswith(".jsonl"):
    out = []
    for lineno, line in enumerate(text.split("\n"), 1):
      if not line.strip():
        continue
      try:
        out.append((lineno, json.loads(line)))
      except json.JSONDecodeError as e:
        raise DataError(f"{file}:{lineno}: not valid JSON ({e.msg}, column {e.colno}); a .jsonl "
                        "file holds one JSON object per line.") from None
    return out
  return _read_json_list(file, text)


def _read_json_list(file: str, text: str) -> list[tuple[int, object]]:
  # Item by item, so an error and every record keep their line number.
  decoder = json.JSONDecoder()
  at = _skip_space(text, 0)
  if text[at:at + 1] != "[":
    raise DataError(f"{file}:{_line(text, at)}: a .json data file must hold one JSON list of "
                    "records ([{...}, {...}]); for one object per line name it .jsonl.")
  out = []
  at = _skip_space(text, at + 1)
  if text[at:at + 1] == "]":
    return out
  while True:
    try:
      value, end = decoder.raw_decode(text, at)
    except json.JSONDecodeError as e:
      raise DataError(f"{file}:{e.lineno}: not valid JSON ({e.msg}, column {e.colno}).") from None
    out.append((_line(text, at), value))
    at = _skip_space(text, end)
    sep = text[at:at + 1]
    if sep == "]":
      break
    if sep != ",":
      raise DataError(f"{file}:{_line(text, at)}: expected ',' or ']' after a record, got "
                      f"{text[at:at + 20]!r}.")
    at = _skip_space(text, at + 1)
  if _skip_space(text, at + 1) != len(text):
    raise DataError(f"{file}:{_line(text, at + 1)}: text after the closing ']' of the list.")
  return out


def prompt_completion_ids(tokenizer, prompts: Sequence[str], completions: Sequence[str]
                          ) -> tuple[list[list[int]], list[list[int]]]:
  """Token lists and loss masks of prompt + completion: BOS (if any) + text + EOS (if any).

  The loss covers the completion and EOS. The prompt's length is the longest common prefix of
  the prompt's and the whole text's tokens, so a token merged across the boundary counts as
  completion (like LLM-Adapters' train_on_inputs=False). Not yet truncated.

  Example:
    >>> ids, masks = prompt_completion_ids(tok, ["2+2="], ["4"])
  """
  if len(prompts) != len(completions):
    raise DataError(f"{len(prompts)} prompts but {len(completions)} completions.")
  if not prompts:
    return [], []
  bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
  eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
  fulls = [p + c for p, c in zip(prompts, completions)]
  prompt_ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
  full_ids = tokenizer(fulls, add_special_tokens=False)["input_ids"]
  ids, masks = [], []
  for p, f in zip(prompt_ids, full_ids):
    common = 0
    for a, b in zip(p, f):
      if a != b:
        break
      common += 1
    seq = bos + list(f) + eos
    start = len(bos) + common
    ids.append(seq)
    masks.append([0] * start + [1] * (len(seq) - start))
  return ids, masks


def fit(ids, masks, max_length: int, *, drop_long: bool = False):
  """Cuts examples to max_length (or drops the longer ones): (ids, masks, kept indices, counts).

  counts: examples, long (longer than max_length), dropped, no_target (kept examples left with
  no target token).

  Example:
    >>> ids, masks, kept, counts = fit(ids, masks, 256, drop_long=True)
  """
  out_ids, out_masks, kept = [], [], []
  long = no_target = 0
  for i, (x, m) in enumerate(zip(ids, masks)):
    if len(x) > max_length:
      long += 1
      if drop_long:
        continue
      x, m = x[:max_length], m[:max_length]
    out_ids.append(list(x))
    out_masks.append(list(m))
    kept.append(i)
    no_target += not any(m[1:])
  counts = {"examples": len(ids), "long": long, "dropped": long if drop_long else 0,
            "no_target": no_target}
  return out_ids, out_masks, kept, counts


def pad(ids, masks, max_length: int, *, pad_id: int) -> dict[str, np.ndarray]:
  """Right-padded (n, max_length) int32 input_ids, attention_mask, loss_mask; one example a row.

  Example:
    >>> pad([[1, 5, 2]], [[0, 1, 1]], 4, pad_id=0)["attention_mask"]   # [[1, 1, 1, 0]]
  """
  n = len(ids)
  out = {"input_ids": np.full((n, max_length), pad_id, np.int32),
         "attention_mask": np.zeros((n, max_length), np.int32),
         "loss_mask": np.zeros((n, max_length), np.int32)}
  for i, (x, m) in enumerate(zip(ids, masks)):
    if len(x) > max_length:
      raise DataError(f"example {i} has {len(x)} tokens, more than max_length={max_length}.")
    out["input_ids"][i, :len(x)] = x
    out["attention_mask"][i, :len(x)] = 1
    out["loss_mask"][i, :len(x)] = m
  return out


def pad_token_id(tokenizer) -> int:
  """The tokenizer's padding id (0 when it has none; padding is masked everywhere).

  Example:
    >>> pad(ids, masks, 512, pad_id=pad_token_id(tokenizer))
  """
  return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def causal_dataset(ids, masks, data_cfg, split: str, *, pad_id: int,
                   records: Optional[list] = None, where: str = "") -> Dataset:
  """The Dataset of tokenized examples: fitted to data.max_length, then padded or packed.

  data.drop_long drops over-long examples (else they are truncated); both are counted in the
  log and in `Dataset.stats`. data.packing packs the train split (eval keeps one example a
  row, so its rows line up with `records`).

  Example:
    >>> ds = causal_dataset(ids, masks, data_cfg, "train", pad_id=0, records=recs, where=file)
  """
  length = int(data_cfg.get("max_length", 128))
  drop_long = bool(data_cfg.get("drop_long", False))
  ids, masks, kept, counts = fit(ids, masks, length, drop_long=drop_long)
  what = f"{where} ({split})" if where else split
  if counts["long"]:
    logging.warning(
        "%s: %d of %d examples are longer than data.max_length=%d tokens and were %s.", what,
        counts["long"], counts["examples"],
        length, "dropped (data.drop_long=True)" if drop_long else
        "truncated (set data.drop_long=True to drop them, or raise data.max_length)")
  if counts["no_target"]:
    logging.warning("%s: %d of %d examples keep no target token within data.max_length=%d; "
                    "raise data.max_length.", what, counts["no_target"], len(ids), length)
  if not ids:
    raise DataError(f"{what}: all {counts['examples']} examples are longer than data.max_length="
                    f"{length} and data.drop_long=True dropped them; raise data.max_length.")
  records = [records[i] for i in kept] if records is not None else None
  stats = dict(counts)
  packed = split == "train" and data_cfg.get("packing", False)
  if packed:
    arrays, packing_stats = packing.pack(ids, masks, length, pad_id=pad_id)
    stats.update(packing_stats)
    logging.info("%s: packed %d examples into %d rows of %d tokens: %.1f%% of row tokens are "
                 "real (%.1f%% one example a row).", what, packing_stats["examples"],
                 packing_stats["rows"], length, 100 * packing_stats["efficiency"],
                 100 * packing_stats["tokens"] / (packing_stats["examples"] * length))
  else:
    arrays = pad(ids, masks, length, pad_id=pad_id)
    tokens = int(arrays["attention_mask"].sum())
    stats.update(rows=len(ids), tokens=tokens, efficiency=tokens / float(len(ids) * length))
  transform = None
  if data_cfg.get("target_logits_only", True):
    transform = target_positions_transform(arrays["loss_mask"], what)
  # Packed rows hold several examples: records line up with rows only unpacked.
  return Dataset(arrays, None, None, examples=None if packed else records, transform=transform,
                 source=where or None, stats=stats)


def target_positions(loss_mask_BxT: np.ndarray, k: int) -> np.ndarray:
  """(B, k) int32: per row, the positions t whose next token is a target (loss_mask[t + 1] = 1),
  in order, then T - 1 (a position that predicts nothing) for the rest.

  Example:
    >>> target_positions(np.array([[0, 0, 1, 1, 0]]), 3).tolist()
    [[1, 2, 4]]
  """
  predicts_BxT1 = np.asarray(loss_mask_BxT)[:, 1:] > 0
  t = loss_mask_BxT.shape[1]
  first_k = np.argsort(~predicts_BxT1, axis=1, kind="stable")[:, :k]
  real = np.arange(k)[None, :] < predicts_BxT1.sum(1)[:, None]
  return np.where(real, first_k, t - 1).astype(np.int32)


def logit_positions_per_row(loss_mask_NxT: np.ndarray) -> Optional[int]:
  """K of `target_positions` for rows like these: the most targets any row has, rounded up to a
  multiple of 8; None where K would exceed half the row (the full logits cost little more then).

  Example:
    >>> logit_positions_per_row(np.array([[0] * 60 + [1] * 4]))
    8
  """
  t = loss_mask_NxT.shape[1]
  most = int((np.asarray(loss_mask_NxT)[:, 1:] > 0).sum(1).max())
  k = max(8, -(-most // 8) * 8)
  return None if k > t // 2 else k


def target_positions_transform(loss_mask_NxT: np.ndarray, what: str = ""):
  """A Dataset transform adding `logit_positions` (B, K) to every batch, K from
  `logit_positions_per_row` over the whole data set: the model then computes the LM head at those
  positions only and the task reads its targets there. None where K is None.

  Example:
    >>> ds = Dataset(arrays, None, None, transform=target_positions_transform(arrays["loss_mask"]))
  """
  k = logit_positions_per_row(loss_mask_NxT)
  if k is None:
    return None
  logging.info("%s: the LM head runs at %d of %d positions a row.", what or "causal LM data", k,
               loss_mask_NxT.shape[1])

  def add_positions(batch: dict) -> dict:
    return {**batch, "logit_positions": target_positions(batch["loss_mask"], k)}

  return add_positions
