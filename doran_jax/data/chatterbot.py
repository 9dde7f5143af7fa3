"""Source 'chatterbot': topic classification of the real English utterances shipped by the
`chatterbot-corpus` package (the offline default).

Example:
  >>> texts, labels, names = chatterbot_examples()
  >>> train = load_dataset(default_data_config("chatterbot"), "train", tokenizer=tok)
"""

from __future__ import annotations

import collections
import glob
import os
from typing import Optional, Sequence

import numpy as np

from doran_jax.data.base import Source, checked_max_length, keep, tokenize_texts
from doran_jax.data.dataset import Dataset
from doran_jax.errors import DataError


def chatterbot_folder() -> str:
  """The English YAML folder of the installed chatterbot-corpus package."""
  try:
    import chatterbot_corpus
  except ImportError as e:
    raise DataError("data source 'chatterbot' needs the package chatterbot-corpus; install it "
                     "with `pip install chatterbot-corpus==1.3.3`.") from e
  return os.path.join(os.path.dirname(chatterbot_corpus.__file__), "data", "english")


def chatterbot_examples(folder: Optional[str] = None, *, min_examples: int = 40
                        ) -> tuple[list[str], list[int], list[str]]:
  """All usable (text, topic) pairs of the chatterbot corpus: texts, labels, label_names.

  Every prompt and response of every conversation is an utterance labelled by its file's first
  `categories` entry. Utterances are deduplicated on their lower-cased, whitespace-collapsed
  form; one that occurs under two topics is dropped (its label is ambiguous), as are
  utterances shorter than 3 characters and topics with fewer than `min_examples` utterances.
  With chatterbot-corpus 1.3.3 and min_examples=40 this leaves 12 topics and 1,640 utterances
  (trivia is the largest at 504; tech support, profile, greetings... fall below 40).

  Example:
    >>> texts, labels, names = chatterbot_examples()
  """
  import yaml
  folder = os.path.expanduser(folder) if folder else chatterbot_folder()
  files = sorted(glob.glob(os.path.join(folder, "*.yml")))
  if not files:
    raise DataError(f"no chatterbot YAML files (*.yml) in {folder!r}; set data.path to the "
                     "corpus's language folder or None for the package's English data.")
  topics = collections.defaultdict(set)   # key -> topics it occurs under
  first_text = {}                          # key -> first original spelling
  for path in files:
    with open(path, encoding="utf-8") as f:
      doc = yaml.safe_load(f) or {}
    cats = doc.get("categories") or [os.path.splitext(os.path.basename(path))[0]]
    topic = str(cats[0]).strip()
    for conversation in doc.get("conversations") or []:
      for utterance in conversation:
        if not isinstance(utterance, str):
          continue
        text = " ".join(utterance.split())
        key = text.lower()
        if len(key) < 3:
          continue
        topics[key].add(topic)
        first_text.setdefault(key, text)
  by_topic = collections.defaultdict(list)
  for key in sorted(topics):
    if len(topics[key]) == 1:
      by_topic[next(iter(topics[key]))].append(first_text[key])
  names = sorted(t for t, items in by_topic.items() if len(items) >= min_examples)
  if len(names) < 2:
    raise DataError(f"only {len(names)} chatterbot topic(s) have >= {min_examples} utterances; "
                     "lower data.min_examples.")
  texts, labels = [], []
  for label, name in enumerate(names):
    texts += by_topic[name]
    labels += [label] * len(by_topic[name])
  return texts, labels, names


def stratified_split(labels: Sequence[int], eval_fraction: float, seed: int
                     ) -> tuple[np.ndarray, np.ndarray]:
  """Deterministic per-class split: (train indices, eval indices), each sorted.

  Each class holds out round(eval_fraction * its size) examples (at least 1).

  Example:
    >>> tr, ev = stratified_split([0, 0, 1, 1, 1], 0.2, seed=0)
  """
  if not 0.0 < eval_fraction < 1.0:
    raise DataError(f"eval_fraction must lie strictly between 0 and 1, got {eval_fraction}.")
  labels = np.asarray(labels)
  train, evals = [], []
  for c in np.unique(labels):
    idx = np.flatnonzero(labels == c)
    idx = idx[np.random.default_rng([int(seed), int(c)]).permutation(len(idx))]
    k = max(1, int(round(eval_fraction * len(idx))))
    evals.append(idx[:k])
    train.append(idx[k:])
  return np.sort(np.concatenate(train)), np.sort(np.concatenate(evals))


def _chatterbot_split(data_cfg, name):
  texts, labels, names = chatterbot_examples(data_cfg.get("path", None),
                                             min_examples=data_cfg.get("min_examples", 40))
  train, evals = stratified_split(labels, data_cfg.get("eval_fraction", 0.2),
                                  data_cfg.get("split_seed", 0))
  parts = {"train": train, "eval": evals}
  if name not in parts:
    raise DataError(f"chatterbot split {name!r} does not exist; use 'train' or 'eval'.")
  idx = parts[name]
  return [texts[i] for i in idx], [labels[i] for i in idx], names


def _load(data_cfg, split, name, ctx) -> Dataset:
  texts, labels, names = _chatterbot_split(data_cfg, name)
  rows = keep(data_cfg, split, len(texts))
  arrays = tokenize_texts(ctx.tokenizer, [texts[i] for i in rows],
                          checked_max_length(data_cfg))
  arrays["labels"] = np.asarray(labels, np.int32)[rows]
  return Dataset(arrays, len(names), names, source=f"chatterbot[{name}]")


def _problems(data_cfg) -> list[str]:
  fraction = data_cfg.get("eval_fraction", 0.2)
  if not isinstance(fraction, (int, float)) or not 0.0 < fraction < 1.0:
    return [f"data.eval_fraction={fraction!r} must lie strictly between 0 and 1."]
  return []


SOURCE = Source(name="chatterbot", tasks=("classification",), splits=("train", "eval"),
                load=_load, problems=_problems,
                keys={"min_examples": 40, "eval_fraction": 0.2})
