"""`Dataset`: equal-length numpy arrays with step-addressed, per-host batches.

`batch(step, ...)` is a pure function of the step, so exact resume needs only the step, and every
host of a multi-host run reads only its own rows. Packed causal-LM rows (see packing.py) are rows
like any other.

Example:
  >>> ds = Dataset({"x": np.arange(10), "labels": np.zeros(10, np.int32)}, 2, None)
  >>> ds.batch(3, 4, seed=0)["x"].shape
  (4,)
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from typing import Callable, Iterator, Optional

import numpy as np

from doran_jax.errors import DataError


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
      LM: input_ids, attention_mask, loss_mask (1 on target tokens only); packed causal-LM rows
      also segment_ids (1, 2, ... per example, 0 = padding) and position_ids.
    num_classes: number of classes (None for causal LM).
    label_names: class names, index = label (None where unknown).
    examples: raw records where evaluation needs them (commonsense, instruction, chat; None
      for packed rows).
    transform: applied to every gathered batch (e.g. uint8 -> normalised float pixels).
    source: where the rows came from (a file, or 'tfds name[split]'), for error messages.
    stats: causal LM: examples, long / dropped / no_target counts, rows, tokens (real) and
      efficiency (real tokens / row tokens); see causal.causal_dataset.
  """

  arrays: dict[str, np.ndarray]
  num_classes: Optional[int]
  label_names: Optional[list[str]]
  examples: Optional[list] = None
  transform: Optional[Callable[[dict], dict]] = None
  source: Optional[str] = None
  stats: Optional[dict] = None

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

  def digest(self) -> str:
    """A short sha256 of every array's name, dtype, shape and bytes (rows in order): equal for
    the same tokenised data, different when any label, token or pixel changed."""
    h = hashlib.sha256()
    for name in sorted(self.arrays):
      a = np.ascontiguousarray(self.arrays[name])
      h.update(f"{name}:{a.dtype.str}:{a.shape};".encode())
      h.update(memoryview(a).cast("B"))
    return h.hexdigest()[:16]

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


def check_labels(train: Dataset, evals: Dataset, num_classes: int, *,
                 declared: bool = False) -> None:
  """Labels a classifier can learn and be scored on, checked before the model is built.

  DataError when the training split has a single class or a label >= `num_classes`; when the
  class count is inferred from the labels (max + 1; `declared=False`) and the training labels
  skip class ids (labels {0, 5} would build a 6-way head with 4 classes that never occur); and
  when an eval label is >= `num_classes` (`check_eval_labels`). `declared`: the class count was
  given (model.num_labels, data.num_classes) or the source names its classes (tfds ClassLabel),
  so absent classes are real. Non-integer labels (regression targets) are not class ids and are
  left alone.

  Example:
    >>> check_labels(train, evals, train.num_classes)   # DataError for training labels {0, 5}
  """
  if "labels" not in train.arrays or num_classes is None:
    return
  labels = np.asarray(train.arrays["labels"])
  if not np.issubdtype(labels.dtype, np.integer):
    return
  found = np.unique(labels).tolist()
  where = train.source or "the train split"
  if len(found) == 1:
    raise DataError(
        f"the training data ({where}, {labels.size} rows) has only label {found[0]}"
        f"{_in_eval(evals)}: a classifier needs at least two classes to learn anything. Check "
        "data.path and data.train_split, or raise data.limit if a small subset missed the other "
        "classes.")
  over = [v for v in found if v >= num_classes]
  if over:
    raise DataError(
        f"training label(s) {_short(over)} in {where} are outside the model's {num_classes} "
        f"classes (model.num_labels or data.num_classes); set it to {max(found) + 1} or fix the "
        "labels.")
  missing = sorted(set(range(int(num_classes))) - set(found))
  if missing and not declared:
    renumber = ", ".join(f"{old}->{new}" for new, old in enumerate(found[:6]))
    raise DataError(
        f"the training labels in {where} are {_short(found)}, so the head gets {num_classes} "
        f"outputs (max label + 1), {len(missing)} of which ({_short(missing)}) never occur in "
        f"training{_in_eval(evals)}. Renumber the labels to 0..{len(found) - 1} ({renumber}"
        f"{', ...' if len(found) > 6 else ''}), or set data.num_classes={num_classes} if those "
        "classes are real but absent from the training split.")
  check_eval_labels(train, evals, num_classes)


def _in_eval(evals: Optional[Dataset]) -> str:
  if evals is None or "labels" not in evals.arrays:
    return ""
  found = np.unique(np.asarray(evals.arrays["labels"])).tolist()
  return f" (the eval split has labels {_short(found)})"


def _short(values: list, n: int = 10) -> str:
  return str(values) if len(values) <= n else f"[{', '.join(map(str, values[:n]))}, ...]"


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
    seen = (np.unique(np.asarray(train.arrays["labels"])).tolist() if "labels" in train.arrays
            else [])
    raise DataError(
        f"eval label(s) {bad.tolist()} in {evals.source or 'the eval split'} "
        f"({int(np.isin(labels, bad).sum())} rows) never occur in the training data "
        f"({train.source or 'the train split'}, labels {seen}), so the model gets only "
        f"{num_classes} classes and cannot score them; fix the eval file, or set "
        f"data.num_classes={int(bad.max()) + 1} if the training set lacks a real class.")
