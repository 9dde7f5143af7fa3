"""Data sets as in-memory numpy arrays with step-addressed, per-host batches.

`load_dataset(data_cfg, split)` reads one of five sources and returns a `Dataset` whose
`batch(step, ...)` is a pure function of the step, so exact resume needs only the step and every
host of a multi-host run reads only its own shard.

Sources (`data_cfg.source`):
  chatterbot   topic classification of the real English utterances shipped by the
               `chatterbot-corpus` package (the offline default; see `chatterbot_examples`).
  tsv          local sentence-classification files `{path}/{split}.tsv` ('sst2' = label<TAB>text,
               'cola' = text<TAB>label).
  tfds         text classification through `tfds.data_source` (array_record; no TensorFlow).
  tfds_image   image classification through `tfds.data_source` (ViT preprocessing).
  commonsense  the DoRA paper's commonsense-reasoning JSON files (see doran_jax.commonsense).

Example:
  >>> cfg = default_data_config("chatterbot", max_length=32)
  >>> train = load_dataset(cfg, "train", tokenizer=tokenizer)
  >>> batch = train.batch(0, 32, seed=0)          # {'input_ids': (32, 32) int32, ..., 'labels'}
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import glob
import importlib
import math
import os
from typing import Callable, Iterator, Optional, Sequence

import ml_collections
import numpy as np

from doran_jax import commonsense
from doran_jax.errors import DataError

SOURCES = ("chatterbot", "tsv", "tfds", "tfds_image", "commonsense")
SPLITS = ("train", "eval")
TSV_FORMATS = ("sst2", "cola")
TSV_LABEL_NAMES = {"sst2": ["negative", "positive"], "cola": ["unacceptable", "acceptable"]}
# Split names used when data_cfg.train_split / eval_split are None, so that switching `source`
# on the command line keeps working (the TSV release calls its eval file 'dev', GLUE
# 'validation'). tfds_image: VTAB-1k style, disjoint train / held-out parts of 'train'.
DEFAULT_SPLITS = {
    "chatterbot": ("train", "eval"),
    "tsv": ("train", "dev"),
    "tfds": ("train", "validation"),
    "tfds_image": ("train[:90%]", "train[90%:]"),
    "commonsense": ("train", "test"),
}
# The model task each source feeds (a text source under a causal LM is a config mistake).
SOURCE_TASKS = {
    "chatterbot": ("classification",), "tsv": ("classification",), "tfds": ("classification",),
    "tfds_image": ("image_classification",), "commonsense": ("causal_lm",),
}


@dataclasses.dataclass
class Dataset:
  """Equal-length numpy arrays plus label metadata; batches are addressed by step.

  Example:
    >>> ds = Dataset({"x": np.arange(10), "labels": np.zeros(10, np.int32)}, 2, None)
    >>> ds.batch(3, 4, seed=0)["x"].shape
    (4,)

  Attributes:
    arrays: name -> array, all with the same first dimension. Text: input_ids, attention_mask,
      token_type_ids, labels (int32). Images: pixel_values (N, C, H, W) stored as uint8 to keep
      memory 4x lower; batches hand out float32 normalised values (see `transform`). Causal
      LM: input_ids, attention_mask, loss_mask (1 on answer tokens only).
    num_classes: number of classes (None for causal LM).
    label_names: class names, index = label (None where unknown).
    examples: raw records where evaluation needs them (commonsense).
    transform: applied to every gathered batch (e.g. uint8 -> normalised float pixels).
    source: where the rows came from (a file, or 'tfds name[split]'), for error messages.
  """

  arrays: dict[str, np.ndarray]
  num_classes: Optional[int]
  label_names: Optional[list[str]]
  examples: Optional[list] = None
  transform: Optional[Callable[[dict], dict]] = None
  source: Optional[str] = None

  def __post_init__(self):
    if not self.arrays:
      raise DataError("a Dataset needs at least one array.")
    sizes = {k: len(v) for k, v in self.arrays.items()}
    if len(set(sizes.values())) != 1:
      raise DataError(f"all arrays of a Dataset must have the same first dimension; got {sizes}.")
    if next(iter(sizes.values())) == 0:
      raise DataError("the data set is empty; check the path, split and limit.")
    if self.examples is not None and len(self.examples) != len(self):
      raise DataError(f"examples has {len(self.examples)} records for {len(self)} rows.")

  def __len__(self) -> int:
    return len(next(iter(self.arrays.values())))

  def _gather(self, idx: np.ndarray) -> dict[str, np.ndarray]:
    out = {k: v[idx] for k, v in self.arrays.items()}
    return self.transform(out) if self.transform is not None else out

  def global_indices(self, step: int, batch_size: int, *, seed: int) -> np.ndarray:
    """Row indices of the global batch at `step` (all processes together).

    Position p = step * batch_size + i lies in epoch p // len; each epoch is one permutation
    drawn from np.random.default_rng([seed, epoch]), so a batch that crosses an epoch boundary
    takes the end of one permutation and the start of the next.

    Example:
      >>> ds.global_indices(0, 4, seed=0)   # e.g. array([7, 2, 9, 0])
    """
    _check_batching(step, batch_size, seed)
    n = len(self)
    pos = step * batch_size + np.arange(batch_size, dtype=np.int64)
    epochs = pos // n
    out = np.empty(batch_size, np.int64)
    for epoch in np.unique(epochs):
      perm = np.random.default_rng([seed, int(epoch)]).permutation(n)
      sel = epochs == epoch
      out[sel] = perm[pos[sel] % n]
    return out

  def batch(self, step: int, batch_size: int, *, seed: int, process_index: int = 0,
            process_count: int = 1) -> dict[str, np.ndarray]:
    """This process's rows of the global training batch at `step` (a pure function of step).

    Returns batch_size // process_count rows: rows [process_index * local, (process_index + 1)
    * local) of the global batch.

    Example:
      >>> local = ds.batch(step, 32, seed=0, process_index=jax.process_index(),
      ...                  process_count=jax.process_count())
    """
    local = _local_size(batch_size, process_index, process_count)
    idx = self.global_indices(step, batch_size, seed=seed)
    return self._gather(idx[process_index * local:(process_index + 1) * local])

  def num_eval_batches(self, batch_size: int) -> int:
    """How many batches `eval_batches(batch_size)` yields (the same on every process)."""
    _check_batching(0, batch_size, 0)
    return math.ceil(len(self) / batch_size)

  def eval_batches(self, batch_size: int, *, process_index: int = 0,
                   process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
    """Every example once, in order; the last global batch padded with weight-0 rows.

    Every batch has a float32 'weights' array (1 real, 0 padding) and, for causal LM, padding
    rows get an all-zero loss_mask. Each process gets its slice of every global batch, and
    all processes get the same number of batches.

    Example:
      >>> for b in ds.eval_batches(128):
      ...   correct += ((predict(b) == b["labels"]) * b["weights"]).sum()
    """
    local = _local_size(batch_size, process_index, process_count)
    n = len(self)
    rows = slice(process_index * local, (process_index + 1) * local)
    for g in range(self.num_eval_batches(batch_size)):
      pos = np.arange(g * batch_size, (g + 1) * batch_size)[rows]
      real = pos < n
      out = self._gather(np.where(real, pos, 0))
      out["weights"] = real.astype(np.float32)
      if "loss_mask" in out:
        out["loss_mask"] = out["loss_mask"] * real[:, None].astype(out["loss_mask"].dtype)
      yield out


def _check_batching(step, batch_size, seed):
  if int(batch_size) <= 0:
    raise DataError(f"batch_size must be positive, got {batch_size}.")
  if int(step) < 0:
    raise DataError(f"step must be >= 0, got {step}.")
  if int(seed) < 0:
    raise DataError(f"seed must be >= 0 (it seeds numpy's default_rng), got {seed}.")


def _local_size(batch_size, process_index, process_count) -> int:
  if process_count <= 0 or not 0 <= process_index < process_count:
    raise DataError(f"process_index {process_index} must lie in [0, process_count="
                     f"{process_count}).")
  if batch_size <= 0 or batch_size % process_count:
    raise DataError(f"batch_size {batch_size} must be a positive multiple of process_count "
                     f"{process_count}; each process reads batch_size // process_count rows.")
  return batch_size // process_count


# ----------------------------------------------------------------------------------- config


def default_data_config(source: str, **overrides) -> ml_collections.ConfigDict:
  """The data section of an experiment config, with defaults for `source`.

  Example:
    >>> c = default_data_config("tsv", path="../shared/data/text/cola", format="cola")
    >>> c = default_data_config("tfds_image", name="oxford_flowers102", image_size=224)

  Keys:
    source: one of SOURCES.
    path: folder (tsv: {path}/{split}.tsv; commonsense: {path}/{task}/{split}.json, or one JSON
      file; chatterbot: None = the package's English folder).
    format: tsv column order, 'sst2' (label<TAB>text) or 'cola' (text<TAB>label).
    name, data_dir: tfds data set name and data_dir (None = ~/tensorflow_datasets).
    text_keys, label_key, image_key: tfds feature names (one or two text keys).
    max_length: tokens per example (padded and truncated; static shapes for jit).
    image_size: tfds_image output size (None = the `image_size` passed to load_dataset).
    train_split, eval_split: split names; None = the source's default (DEFAULT_SPLITS).
    limit: cap on training examples, a random subset drawn from `seed` (sample efficiency).
    eval_limit: cap on eval examples, a random subset drawn from `split_seed`.
    seed: seeds the `limit` subset.
    split_seed: seeds chatterbot's train/eval split and the eval_limit subset; kept apart from
      `seed` so the eval set stays fixed across training seeds.
    min_examples, eval_fraction: chatterbot: keep topics with at least this many utterances;
      the stratified share held out for eval.
    tasks, train_tasks, task, train_file: commonsense: task folders to evaluate on (`tasks`) and
      to train on (`train_tasks`, None = `tasks`; the defaults are the tasks kept in
      ../shared/data/commonsense, of which only four ship a train.json); `task` (if set) replaces
      both with that one task; `train_file` (if set) trains on this JSON list instead (e.g. the
      170k combined file) while eval still reads the task folders.
    num_classes: tsv: None = inferred from the labels (max + 1).
  """
  if source not in SOURCES:
    raise DataError(f"unknown data source {source!r}; choose one of {', '.join(SOURCES)}.")
  c = dict(source=source, path=None, format=None, name=None, data_dir=None,
           text_keys=("sentence",), label_key="label", image_key="image", max_length=128,
           image_size=None, train_split=None, eval_split=None, limit=None, eval_limit=None,
           seed=0, split_seed=0, min_examples=40, eval_fraction=0.2, tasks=(), train_tasks=None,
           task=None, train_file=None, num_classes=None)
  if source == "tsv":
    c.update(format="sst2")
  elif source == "tfds":
    c.update(name="glue/sst2")
  elif source == "tfds_image":
    # VTAB-1k: 800 training and 200 held-out validation images. For the protocol's final
    # numbers train on train_split="train[:800]+train[45000:45200]" (cifar100), limit=None,
    # and score eval_split="test", eval_limit=None.
    c.update(name="cifar100", limit=800, eval_limit=200)
  elif source == "commonsense":
    c.update(max_length=256, tasks=commonsense.LOCAL_TASKS,
             train_tasks=commonsense.LOCAL_TRAIN_TASKS)
  unknown = sorted(set(overrides) - set(c))
  if unknown:
    raise DataError(f"unknown data config key(s) {unknown}; known keys: {', '.join(sorted(c))}.")
  c.update(overrides)
  return ml_collections.ConfigDict(c)


def config_problems(data_cfg, task: Optional[str] = None) -> list[str]:
  """Everything wrong with a data section, checked without reading any data (one line each).

  Local paths must exist; `task` (config.model.task) must be one the source feeds.

  Example:
    >>> config_problems(default_data_config("tsv", path="no/such/folder"))
    ["data.path='no/such/folder' does not exist; ..."]
  """
  problems = []
  source = data_cfg.get("source", None)
  if source not in SOURCES:
    return [f"data.source={source!r} is not a data source; choose one of {', '.join(SOURCES)}."]
  if task is not None and task not in SOURCE_TASKS[source]:
    problems.append(f"data.source={source!r} feeds model.task {' or '.join(SOURCE_TASKS[source])}, "
                    f"but model.task={task!r}; change one of them.")
  max_length = data_cfg.get("max_length", None)
  if source != "tfds_image" and (not _is_int(max_length) or max_length <= 1):
    problems.append(f"data.max_length={max_length!r} must be an integer > 1 (tokens).")
  for key in ("limit", "eval_limit"):
    value = data_cfg.get(key, None)
    if value is not None and (not _is_int(value) or value <= 0):
      problems.append(f"data.{key}={value!r} must be a positive number of examples or None.")
  for key in ("seed", "split_seed"):
    value = data_cfg.get(key, 0)
    if not _is_int(value) or value < 0:
      problems.append(f"data.{key}={value!r} must be an integer >= 0.")
  path = data_cfg.get("path", None)
  if path is not None and not isinstance(path, str):
    problems.append(f"data.path={path!r} must be a string (a folder or file).")
    path = None
  if source in ("tsv", "commonsense") and not path:
    problems.append(f"data source {source!r} needs data.path (e.g. ../shared/data/"
                    f"{'text/sst2' if source == 'tsv' else 'commonsense'}).")
  elif path and not os.path.exists(os.path.expanduser(path)):
    problems.append(f"data.path={path!r} does not exist (relative to {os.getcwd()}); point it "
                    "at the data folder.")
  elif source == "tsv":
    fmt = data_cfg.get("format", None)
    if fmt not in TSV_FORMATS:
      problems.append(f"data.format={fmt!r} is not a TSV format; choose 'sst2' "
                      "(label<TAB>sentence) or 'cola' (sentence<TAB>label).")
    for split in SPLITS:
      file = os.path.join(os.path.expanduser(path), f"{split_name(data_cfg, split)}.tsv")
      if not os.path.isfile(file):
        problems.append(f"the {split} file {file!r} does not exist; check data.path and "
                        f"data.{split}_split.")
    num_classes = data_cfg.get("num_classes", None)
    if num_classes is not None and (not _is_int(num_classes) or num_classes < 2):
      problems.append(f"data.num_classes={num_classes!r} must be an integer >= 2 or None.")
  if source == "commonsense":
    names = [data_cfg.get("task", None)] if data_cfg.get("task", None) else (
        list(data_cfg.get("tasks", ()) or ()) + list(data_cfg.get("train_tasks", None) or ()))
    unknown = sorted({str(n) for n in names if n not in commonsense.TASKS})
    if unknown:
      problems.append(f"unknown commonsense task(s) {unknown} in data.task/tasks/train_tasks; "
                      f"choose among {', '.join(commonsense.TASKS)}.")
    train_file = data_cfg.get("train_file", None)
    if train_file and not os.path.isfile(os.path.expanduser(train_file)):
      problems.append(f"data.train_file={train_file!r} does not exist.")
  if source == "chatterbot":
    fraction = data_cfg.get("eval_fraction", 0.2)
    if not isinstance(fraction, (int, float)) or not 0.0 < fraction < 1.0:
      problems.append(f"data.eval_fraction={fraction!r} must lie strictly between 0 and 1.")
  if source in ("tfds", "tfds_image"):
    if not data_cfg.get("name", None):
      problems.append("tfds sources need data.name, e.g. 'glue/sst2' or 'cifar100'.")
    data_dir = data_cfg.get("data_dir", None)
    if data_dir and not os.path.isdir(os.path.expanduser(data_dir)):
      problems.append(f"data.data_dir={data_dir!r} is not a folder; point it at the prepared "
                      "tensorflow_datasets folder.")
  if source == "tfds" and len(tuple(data_cfg.get("text_keys", ("sentence",)))) not in (1, 2):
    problems.append(f"data.text_keys={data_cfg.text_keys!r} must name one or two text features.")
  return problems


def _is_label(text: str) -> bool:
  return text.strip().lstrip("-").isdigit()


def _is_int(value) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def check_eval_labels(train: Dataset, evals: Dataset, num_classes: int) -> None:
  """An eval label the model cannot predict (>= its number of classes) is a DataError.

  The model's class count comes from the training data (or data.num_classes); a label that
  occurs only in the eval split would be scored by a model with too few outputs.
  """
  if "labels" not in evals.arrays or num_classes is None:
    return
  labels = np.asarray(evals.arrays["labels"])
  bad = np.unique(labels[labels >= num_classes])
  if bad.size:
    seen = np.unique(np.asarray(train.arrays["labels"])).tolist() if "labels" in train.arrays else []
    raise DataError(
        f"eval label(s) {bad.tolist()} in {evals.source or 'the eval split'} "
        f"({int(np.isin(labels, bad).sum())} rows) never occur in the training data "
        f"({train.source or 'the train split'}, labels {seen}), so the model gets only "
        f"{num_classes} classes and cannot score them; fix the eval file, or set "
        f"data.num_classes={int(bad.max()) + 1} if the training set lacks a real class.")


def split_name(data_cfg, split: str) -> str:
  """The configured name of 'train' / 'eval' for data_cfg's source."""
  if split not in SPLITS:
    raise DataError(f"split must be 'train' or 'eval', got {split!r}.")
  source = data_cfg.get("source", None)
  if source not in SOURCES:
    raise DataError(f"unknown data source {source!r}; choose one of {', '.join(SOURCES)}.")
  name = data_cfg.get(f"{split}_split", None)
  return name if name else DEFAULT_SPLITS[source][SPLITS.index(split)]


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


# ----------------------------------------------------------------------------- entry point


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
  source = data_cfg.source
  if source == "tfds_image":
    return _load_tfds_image(data_cfg, split, name, image_size or data_cfg.get("image_size", None),
                            image_norm)
  if tokenizer is None:
    raise DataError(f"data source {source!r} needs a tokenizer: pass tokenizer="
                     "transformers.AutoTokenizer.from_pretrained(...).")
  max_length = _max_length(data_cfg)
  if source == "commonsense":
    return _load_commonsense(data_cfg, split, name, tokenizer, max_length)
  readers = {"chatterbot": _read_chatterbot, "tsv": _read_tsv_source, "tfds": _read_tfds_text}
  texts, pairs, labels, num_classes, label_names = readers[source](data_cfg, split, name)
  if labels.max() >= num_classes:
    raise DataError(f"label {labels.max()} is out of range for num_classes={num_classes}; set "
                     "data.num_classes to the number of classes.")
  arrays = tokenize_texts(tokenizer, texts, max_length, pairs=pairs)
  arrays["labels"] = labels
  where = (_tsv_file(data_cfg, name) if source == "tsv"
           else f"{source} {data_cfg.get('name', None) or ''}[{name}]".replace(" [", "["))
  return Dataset(arrays, num_classes, label_names, source=where)


def _max_length(data_cfg) -> int:
  max_length = data_cfg.get("max_length", None)
  if not isinstance(max_length, int) or max_length <= 1:
    raise DataError(f"data.max_length must be an integer > 1 (tokens), got {max_length!r}.")
  return max_length


def _keep(data_cfg, split, n) -> np.ndarray:
  if split == "train":
    return subset_indices(n, data_cfg.get("limit", None), data_cfg.get("seed", 0))
  return subset_indices(n, data_cfg.get("eval_limit", None), data_cfg.get("split_seed", 0))


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


# ------------------------------------------------------------------------------ chatterbot


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


def _read_chatterbot(data_cfg, split, name):
  texts, labels, names = _chatterbot_split(data_cfg, name)
  keep = _keep(data_cfg, split, len(texts))
  return [texts[i] for i in keep], None, np.asarray(labels, np.int32)[keep], len(names), names


# ------------------------------------------------------------------------------------- tsv


def _tsv_file(data_cfg, name) -> str:
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


def _read_tsv_source(data_cfg, split, name):
  texts, labels = read_tsv(_tsv_file(data_cfg, name), data_cfg.get("format", None))
  num_classes = data_cfg.get("num_classes", None) or max(labels) + 1
  names = TSV_LABEL_NAMES[data_cfg.format]
  keep = _keep(data_cfg, split, len(texts))
  return ([texts[i] for i in keep], None, np.asarray(labels, np.int32)[keep], int(num_classes),
          names if num_classes == len(names) else None)


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
    if not _is_label(cols[label_col]):
      hint = (f"; column {1 - label_col} is an integer, so the file looks like format "
              f"{'cola' if fmt == 'sst2' else 'sst2'!r}: set data.format accordingly"
              if _is_label(cols[1 - label_col]) else
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


# ------------------------------------------------------------------------------------ tfds


# Legacy builders (glue, ...) register only when their category package is imported;
# tfds's own lazy import does not do that for data_source.
_TFDS_LEGACY_PACKAGES = ("text", "image_classification", "image")


def tfds_source(name: str, split: str, data_dir: Optional[str] = None):
  """`tfds.data_source(name, split)` that never downloads; clear errors when not prepared.

  Example:
    >>> src = tfds_source("glue/cola", "validation", data_dir="~/tensorflow_datasets")
    >>> len(src), src[0]["sentence"]
  """
  import tensorflow_datasets as tfds
  from tensorflow_datasets.core import registered
  data_dir = os.path.expanduser(data_dir) if data_dir else None
  where = data_dir or "~/tensorflow_datasets (or $TFDS_DATA_DIR)"
  for attempt in range(2):
    try:
      return tfds.data_source(name, split=split, data_dir=data_dir, download=False,
                              try_gcs=False)
    except registered.DatasetNotFoundError as e:
      if attempt:
        raise DataError(f"unknown tensorflow-datasets name {name!r}; check data.name "
                         "(e.g. 'glue/sst2', 'cifar100').") from e
      for pkg in _TFDS_LEGACY_PACKAGES:
        try:
          importlib.import_module(f"tensorflow_datasets.{pkg}")
        except Exception:  # pylint: disable=broad-except
          pass  # a category that needs TensorFlow; its data sets stay unavailable
    except Exception as e:  # pylint: disable=broad-except
      raise DataError(
          f"tfds data set {name!r} (split {split!r}) is not prepared in array_record format in "
          f"data_dir {where}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. "
          f"This loader never downloads. Where you have network, run `tfds build {name} "
          f"--data_dir=DIR --file_format=array_record` (or tfds.data_source({name!r}, "
          "data_dir=DIR) with download allowed), copy DIR here and set data.data_dir.") from e


def _tfds_read(data_cfg, split, name):
  """(records of the kept rows, the source's feature dict)."""
  tfds_name = data_cfg.get("name", None)
  if not tfds_name:
    raise DataError("tfds sources need data.name, e.g. 'glue/sst2' or 'cifar100'.")
  src = tfds_source(tfds_name, name, data_cfg.get("data_dir", None))
  keep = _keep(data_cfg, split, len(src))
  records = [src[int(i)] for i in keep]
  return records, src.dataset_info.features


def _labels_info(records, features, label_key):
  if records and label_key not in records[0]:
    raise DataError(f"feature {label_key!r} not in the data set; data.label_key must be one of "
                     f"{sorted(records[0])}.")
  labels = np.asarray([int(r[label_key]) for r in records], np.int32)
  if labels.size and labels.min() < 0:
    raise DataError(f"the split has unlabelled examples (label {labels.min()}), e.g. GLUE's "
                     "test split; choose a labelled split for data.train_split/eval_split.")
  feature = features[label_key] if label_key in features else None
  num_classes = getattr(feature, "num_classes", None) or int(labels.max()) + 1
  names = getattr(feature, "names", None)
  return labels, int(num_classes), (list(names) if names else None)


def _text(value) -> str:
  if isinstance(value, np.ndarray):
    value = value.item()
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _read_tfds_text(data_cfg, split, name):
  """texts, pairs, labels, num_classes, label_names; only the kept records are read."""
  keys = tuple(data_cfg.get("text_keys", ("sentence",)))
  if len(keys) not in (1, 2):
    raise DataError(f"data.text_keys must name one or two text features, got {keys}.")
  records, features = _tfds_read(data_cfg, split, name)
  for k in keys:
    if records and k not in records[0]:
      raise DataError(f"text feature {k!r} not in the data set; data.text_keys must be among "
                       f"{sorted(records[0])}.")
  labels, num_classes, names = _labels_info(records, features, data_cfg.get("label_key", "label"))
  texts = [_text(r[keys[0]]) for r in records]
  pairs = [_text(r[keys[1]]) for r in records] if len(keys) == 2 else None
  return texts, pairs, labels, num_classes, names


# ------------------------------------------------------------------------------ tfds_image


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
  """(H, W[, C]) uint8 -> (size, size, 3) uint8, bilinear (PIL; antialiased when shrinking).

  Grey and RGBA images become RGB, since ViT takes three channels.

  Example:
    >>> resize_image(np.zeros((32, 32, 3), np.uint8), 224).shape
    (224, 224, 3)
  """
  from PIL import Image
  image = np.asarray(image)
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  if image.dtype != np.uint8:
    raise DataError(f"expected uint8 images, got {image.dtype}; decode the image feature first.")
  pil = Image.fromarray(image).convert("RGB")
  return np.asarray(pil.resize((size, size), Image.BILINEAR), np.uint8)


def normalize_pixels(batch: dict, mean: float, std: float) -> dict:
  """uint8 NCHW pixel_values -> float32 (x / 255 - mean) / std, the family's image processor.

  Example:
    >>> normalize_pixels({"pixel_values": np.full((1, 3, 2, 2), 255, np.uint8)}, 0.5, 0.5)
  """
  out = dict(batch)
  pixels = batch["pixel_values"].astype(np.float32) / 255.0
  out["pixel_values"] = (pixels - mean) / std
  return out


def _load_tfds_image(data_cfg, split, name, image_size, image_norm) -> Dataset:
  if not isinstance(image_size, int) or image_size <= 0:
    raise DataError(f"tfds_image needs a positive integer image size, got {image_size!r}: pass "
                     "image_size= (the model's config.image_size) or set data.image_size.")
  if image_norm is None or len(image_norm) != 2 or None in image_norm:
    raise DataError(f"tfds_image needs image_norm=(mean, std), the model family's image "
                    f"constants (bb.family.image_mean, bb.family.image_std), got {image_norm!r}; "
                    "is the model an image model?")
  records, features = _tfds_read(data_cfg, split, name)
  key = data_cfg.get("image_key", "image")
  if records and key not in records[0]:
    raise DataError(f"image feature {key!r} not in the data set; data.image_key must be among "
                     f"{sorted(records[0])}.")
  labels, num_classes, names = _labels_info(records, features, data_cfg.get("label_key", "label"))
  # Stored as uint8 NCHW (4x smaller than float32); normalize_pixels runs per batch.
  pixels = np.stack([resize_image(r[key], image_size) for r in records]).transpose(0, 3, 1, 2)
  return Dataset({"pixel_values": np.ascontiguousarray(pixels), "labels": labels}, num_classes,
                 names, transform=functools.partial(normalize_pixels, mean=float(image_norm[0]),
                                                    std=float(image_norm[1])))


# ----------------------------------------------------------------------------- commonsense


def _load_commonsense(data_cfg, split, name, tokenizer, max_length) -> Dataset:
  records = commonsense.read_split(data_cfg, split, name)
  keep = _keep(data_cfg, split, len(records))
  records = [records[i] for i in keep]
  arrays = commonsense.tokenize_examples(records, tokenizer, max_length)
  return Dataset(arrays, None, None, examples=records)
