"""Source 'tsv': local sentence-classification files `{path}/{split}.tsv`.

Formats (data.format): 'sst2' = label<TAB>text, 'cola' = text<TAB>label.

Example:
  >>> texts, labels = read_tsv("../shared/data/text/cola/dev.tsv", "cola")
"""

from __future__ import annotations

import glob
import os

import numpy as np

from doran_jax.data.base import (SPLITS, Source, checked_max_length, is_int, keep, resolve_split,
                                 tokenize_texts)
from doran_jax.data.dataset import Dataset
from doran_jax.errors import DataError

TSV_FORMATS = ("sst2", "cola")
TSV_LABEL_NAMES = {"sst2": ["negative", "positive"], "cola": ["unacceptable", "acceptable"]}


def tsv_file(data_cfg, name) -> str:
  path = data_cfg.get("path", None)
  if not path:
    raise DataError("data source 'tsv' needs data.path, the folder holding train.tsv and "
                     "dev.tsv (e.g. ../shared/data/text/sst2).")
  path = os.path.expanduser(path)
  file = os.path.join(path, f"{name}.tsv")
  if not os.path.isfile(file):
    found = sorted(glob.glob(os.path.join(path, "*.tsv")))
    raise DataError(f"TSV file {file!r} does not exist; check data.path={path!r} and the split "
                     f"name {name!r} (files found: {found}).")
  return file


def _load(data_cfg, split, name, ctx) -> Dataset:
  file = tsv_file(data_cfg, name)
  texts, labels = read_tsv(file, data_cfg.get("format", None))
  num_classes = int(data_cfg.get("num_classes", None) or max(labels) + 1)
  names = TSV_LABEL_NAMES[data_cfg.format]
  rows = keep(data_cfg, split, len(texts))
  labels = np.asarray(labels, np.int32)[rows]
  if labels.max() >= num_classes:
    raise DataError(f"label {labels.max()} is out of range for num_classes={num_classes}; set "
                    "data.num_classes to the number of classes.")
  arrays = tokenize_texts(ctx.tokenizer, [texts[i] for i in rows],
                          checked_max_length(data_cfg))
  arrays["labels"] = labels
  return Dataset(arrays, num_classes, names if num_classes == len(names) else None, source=file)


def read_tsv(file: str, fmt: str) -> tuple[list[str], list[int]]:
  """Reads label/sentence TSV lines: 'sst2' = label<TAB>text, 'cola' = text<TAB>label.

  Example:
    >>> texts, labels = read_tsv("../shared/data/text/cola/dev.tsv", "cola")
  """
  if fmt not in TSV_FORMATS:
    raise DataError(f"unknown TSV format {fmt!r}; choose 'sst2' (label<TAB>sentence) or 'cola' "
                     "(sentence<TAB>label).")
  label_col = 0 if fmt == "sst2" else 1
  texts, labels = [], []
  with open(file, "rb") as f:
    raw_lines = f.read().split(b"\n")
  for lineno, raw in enumerate(raw_lines, 1):
    try:
      line = raw.decode("utf-8").rstrip("\r")
    except UnicodeDecodeError as e:
      raise DataError(
          f"{file}:{lineno}: not UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1}); "
          f"save the file as UTF-8, e.g. `iconv -f latin1 -t utf-8 {file} > fixed.tsv`.") from None
    if not line.strip():
      continue
    cols = line.split("\t")
    if len(cols) != 2:
      raise DataError(
          f"{file}:{lineno}: {len(cols)} tab-separated column(s), expected 2 (format 'sst2' is "
          f"label<TAB>sentence, 'cola' is sentence<TAB>label; data.format={fmt!r}); got "
          f"{line[:80]!r}. A tab inside a sentence must be removed; GLUE's original 4-column CoLA "
          "files must be cut to sentence and label first.")
    if not is_label(cols[label_col]):
      hint = (f"; column {1 - label_col} is an integer, so the file looks like format "
              f"{'cola' if fmt == 'sst2' else 'sst2'!r}: set data.format accordingly"
              if is_label(cols[1 - label_col]) else
              " (a header line must be removed)")
      raise DataError(f"{file}:{lineno}: format {fmt!r} needs an integer label in column "
                      f"{label_col + 1}, got {cols[label_col][:40]!r}{hint}.")
    labels.append(int(cols[label_col]))
    texts.append(cols[1 - label_col])
  if not texts:
    raise DataError(f"TSV file {file!r} has no examples.")
  if min(labels) < 0:
    raise DataError(f"{file} has negative labels ({min(labels)}); labels must be 0..C-1.")
  return texts, labels


def is_label(text: str) -> bool:
  return text.strip().lstrip("-").isdigit()


def _problems(data_cfg) -> list[str]:
  problems = []
  path = data_cfg.get("path", None)
  if not isinstance(path, str) or not os.path.isdir(os.path.expanduser(path)):
    return problems   # the shared path checks report it
  fmt = data_cfg.get("format", None)
  if fmt not in TSV_FORMATS:
    problems.append(f"data.format={fmt!r} is not a TSV format; choose 'sst2' "
                    "(label<TAB>sentence) or 'cola' (sentence<TAB>label).")
  for split in SPLITS:
    name = resolve_split(data_cfg, split, SOURCE.splits)
    file = os.path.join(os.path.expanduser(path), f"{name}.tsv")
    if not os.path.isfile(file):
      problems.append(f"the {split} file {file!r} does not exist; check data.path and "
                      f"data.{split}_split.")
  num_classes = data_cfg.get("num_classes", None)
  if num_classes is not None and (not is_int(num_classes) or num_classes < 2):
    problems.append(f"data.num_classes={num_classes!r} must be an integer >= 2 or None.")
  return problems


SOURCE = Source(name="tsv", tasks=("classification",), splits=("train", "dev"), load=_load,
                problems=_problems, needs_path=True, overrides={"format": "sst2"})
