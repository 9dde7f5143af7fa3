"""The data sources by name (`data.source`), and `load_dataset`, which dispatches to them.

Each source module declares its `Source` (base.py): the tasks it feeds, its default split names,
its config keys, its loader and its checks. A new source is one module plus one entry here.

Example:
  >>> get("chat").splits
  ('train', 'dev')
  >>> ds = load_dataset(default_data_config("chatterbot"), "train", tokenizer=tok)
"""

from __future__ import annotations

from typing import Optional

from doran_jax.data import chat, chatterbot, commonsense, instruction, tfds, tsv
from doran_jax.data.base import LoadContext, Source, resolve_split
from doran_jax.data.dataset import Dataset
from doran_jax.errors import DataError

REGISTRY: dict[str, Source] = {s.name: s for s in (
    chatterbot.SOURCE, tsv.SOURCE, tfds.TEXT_SOURCE, tfds.IMAGE_SOURCE, commonsense.SOURCE,
    instruction.SOURCE, chat.SOURCE)}
SOURCES = tuple(REGISTRY)
# Split names used when data.train_split / eval_split are None, so that switching `source` on
# the command line keeps working (the TSV release calls its eval file 'dev', GLUE 'validation').
DEFAULT_SPLITS = {name: s.splits for name, s in REGISTRY.items()}
# The model task each source feeds (a text source under a causal LM is a config mistake).
SOURCE_TASKS = {name: s.tasks for name, s in REGISTRY.items()}


def get(name) -> Source:
  """The `Source` named `name`; a DataError listing the sources otherwise.

  Example:
    >>> get("commonsense").tasks
    ('causal_lm',)
  """
  if name not in REGISTRY:
    raise DataError(f"unknown data source {name!r}; choose one of {', '.join(SOURCES)}.")
  return REGISTRY[name]


def split_name(data_cfg, split: str) -> str:
  """The configured name of 'train' / 'eval' for data_cfg's source.

  Example:
    >>> split_name(default_data_config("tsv"), "eval")
    'dev'
  """
  if split not in ("train", "eval"):
    raise DataError(f"split must be 'train' or 'eval', got {split!r}.")
  return resolve_split(data_cfg, split, get(data_cfg.get("source", None)).splits)


def load_dataset(data_cfg, split: str, *, tokenizer=None, image_size: Optional[int] = None,
                 image_norm: Optional[tuple[float, float]] = None) -> Dataset:
  """Loads the 'train' or 'eval' split described by `data_cfg` (see default_data_config).

  Images need `image_size` and `image_norm`, the model family's (image_mean, image_std)
  (`(bb.family.image_mean, bb.family.image_std)`; run.setup passes them).

  Example:
    >>> tok = transformers.AutoTokenizer.from_pretrained(models.minilm_path())
    >>> ds = load_dataset(default_data_config("chatterbot"), "train", tokenizer=tok)
  """
  name = split_name(data_cfg, split)
  source = get(data_cfg.get("source", None))
  if source.needs_tokenizer and tokenizer is None:
    raise DataError(f"data source {source.name!r} needs a tokenizer: pass tokenizer="
                    "transformers.AutoTokenizer.from_pretrained(...).")
  ctx = LoadContext(tokenizer=tokenizer, image_size=image_size, image_norm=image_norm)
  return source.load(data_cfg, split, name, ctx)
