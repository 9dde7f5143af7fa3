"""What every data source shares: the `Source` record, split names, subsets, config checks.

A source module (chatterbot.py, tsv.py, ...) declares one `Source`: the model tasks it feeds,
its default split names, the config keys it owns, its loader and its config checks; the
registry (registry.py) collects them. Nothing here reads data.

Example:
  >>> SOURCE = Source(name="tsv", tasks=("classification",), splits=("train", "dev"),
  ...                 load=_load, problems=_problems)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from doran_jax.errors import DataError

SPLITS = ("train", "eval")


@dataclasses.dataclass(frozen=True)
class Source:
  """One data source: everything the registry, the config and the loader need to know.

  Attributes:
    name: the value of data.source.
    tasks: the model tasks (config.model.task) it feeds.
    splits: default (train, eval) split names, used where data.train_split / eval_split are None.
    load: `load(data_cfg, split, name, ctx) -> Dataset`; `split` is 'train' or 'eval', `name`
      the resolved split name, `ctx` a `LoadContext`.
    keys: config keys this source owns, with their defaults (present in every source's config so
      that switching data.source on the command line keeps working).
    overrides: values of shared or own keys when this source is chosen (e.g. max_length=256).
    problems: `problems(data_cfg) -> list[str]`, its checks that read no data.
    needs_path: data.path is required (checked before loading).
    needs_tokenizer: the loader tokenizes text.
  """

  name: str
  tasks: tuple[str, ...]
  splits: tuple[str, str]
  load: Callable[..., Any]
  keys: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  problems: Optional[Callable[[Any], list]] = None
  needs_path: bool = False
  needs_tokenizer: bool = True


@dataclasses.dataclass(frozen=True)
class LoadContext:
  """What `load_dataset` hands a source's loader besides the config (the caller's objects)."""

  tokenizer: Any = None
  image_size: Optional[int] = None
  image_norm: Optional[tuple[float, float]] = None


def resolve_split(data_cfg, split: str, defaults: tuple[str, str]) -> str:
  """The configured name of 'train' / 'eval' (data.{split}_split), else the source's default.

  Example:
    >>> resolve_split({"eval_split": None}, "eval", ("train", "dev"))
    'dev'
  """
  if split not in SPLITS:
    raise DataError(f"split must be 'train' or 'eval', got {split!r}.")
  name = data_cfg.get(f"{split}_split", None)
  return name if name else defaults[SPLITS.index(split)]


def is_int(value) -> bool:
  """An int (Python or NumPy), not a bool.

  Example:
    >>> is_int(np.int32(3)), is_int(True)
    (True, False)
  """
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def subset_indices(n: int, limit: Optional[int], seed: int) -> np.ndarray:
  """Sorted indices of a random subset of min(limit, n) of range(n) (all of it if no limit).

  Example:
    >>> subset_indices(10, 3, seed=0)     # e.g. array([2, 5, 8])
  """
  if limit is None:
    return np.arange(n)
  if int(limit) <= 0:
    raise DataError(f"limit must be a positive number of examples or None, got {limit}.")
  if limit >= n:
    return np.arange(n)
  return np.sort(np.random.default_rng([int(seed), n]).permutation(n)[:int(limit)])


def keep(data_cfg, split: str, n: int) -> np.ndarray:
  """The rows of a split of n examples that data.limit (train) / data.eval_limit (eval) keep.

  Example:
    >>> records = [records[i] for i in keep(data_cfg, "train", len(records))]
  """
  if split == "train":
    return subset_indices(n, data_cfg.get("limit", None), data_cfg.get("seed", 0))
  return subset_indices(n, data_cfg.get("eval_limit", None), data_cfg.get("split_seed", 0))


def checked_max_length(data_cfg) -> int:
  """data.max_length, checked (tokens per row).

  Example:
    >>> checked_max_length({"max_length": 256})
    256
  """
  value = data_cfg.get("max_length", None)
  if not is_int(value) or value <= 1:
    raise DataError(f"data.max_length must be an integer > 1 (tokens), got {value!r}.")
  return int(value)


def tokenize_texts(tokenizer, texts: Sequence[str], max_length: int, *,
                   pairs: Optional[Sequence[str]] = None) -> dict[str, np.ndarray]:
  """Pads/truncates to max_length; returns int32 input_ids, attention_mask (, token_type_ids).

  Example:
    >>> tokenize_texts(tok, ["a fine film"], 16)["input_ids"].shape
    (1, 16)
  """
  enc = tokenizer(list(texts), list(pairs) if pairs is not None else None, padding="max_length",
                  truncation=True, max_length=max_length, return_tensors="np")
  keys = ("input_ids", "attention_mask", "token_type_ids")
  return {k: np.asarray(enc[k], np.int32) for k in keys if k in enc}
