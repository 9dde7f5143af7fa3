"""What a training run shows and records: a tqdm bar, `metrics.jsonl`, optional TensorBoard.

Every record is one JSON object per line in `<workdir>/metrics.jsonl`, keyed by `step` and
prefixed names (`train/loss`, `train/lr`, `train/examples_per_s`, `eval/accuracy`, ...), the
same scalars go to TensorBoard (`<workdir>/tensorboard`, via tensorboardX, no TensorFlow) when
`config.tensorboard=True`. Only the writer built with `enabled=True` (process 0) writes.

In a bucket (a URL workdir) an object cannot be appended to, so the records are kept and the
object is uploaded again at most every `REMOTE_FLUSH_S` seconds and on `close` (a killed run
loses at most that much of the file; a resume rewrites the steps after its checkpoint anyway).

Example:
  >>> with MetricWriter("runs/x", total_steps=100) as writer:
  ...   writer.train_step(1, {"loss": 0.69, "lr": 1e-3}, examples_per_s=55.0)
  ...   writer.write(100, flatten_metrics({"accuracy": 0.91}, prefix="eval/"))
"""

from __future__ import annotations

import io
import json
import math
import numbers
import sys
import time
from typing import Optional

from tqdm import tqdm

from doran_jax import paths
from doran_jax.errors import ConfigError
from doran_jax.files import append_text, write_text

REMOTE_FLUSH_S = 30.0


def flatten_metrics(metrics: dict, prefix: str = "") -> dict[str, float]:
  """Numeric leaves of a nested dict as {'prefix' + 'a/b': value}; other leaves are dropped.

  Example:
    >>> flatten_metrics({"accuracy": 0.9, "commonsense": {"boolq": 0.7}}, "eval/")
    {'eval/accuracy': 0.9, 'eval/commonsense/boolq': 0.7}
  """
  out = {}
  for key, value in metrics.items():
    if isinstance(value, dict):
      out.update(flatten_metrics(value, f"{prefix}{key}/"))
    elif isinstance(value, numbers.Number) and not isinstance(value, bool):
      out[f"{prefix}{key}"] = float(value)
  return out


def truncate_metrics(path: str, step: int) -> int:
  """Drops the records after `step` from a metrics.jsonl (a resume from `step` rewrites them).

  Returns how many records were dropped. A torn last line (a crash mid-write) is dropped too.

  Example:
    >>> truncate_metrics("runs/x/metrics.jsonl", 200)   # resumed from the step-200 checkpoint
  """
  if not paths.isfile(path):
    return 0
  lines = io.StringIO(paths.read_bytes(path).decode("utf-8"), newline=None).readlines()
  kept = []
  for line in lines:
    try:
      record = json.loads(line)
    except ValueError:
      continue
    if isinstance(record, dict) and int(record.get("step", 0)) <= step:
      kept.append(line if line.endswith("\n") else line + "\n")
  if len(kept) != len(lines):
    write_text(path, "".join(kept))
  return len(lines) - len(kept)


def _bar_wanted(progress_bar: Optional[bool]) -> bool:
  if progress_bar is not None:
    return bool(progress_bar)
  # Auto: a terminal or a notebook; batch logs (nohup, CI) keep the plain periodic lines.
  return sys.stderr.isatty() or "ipykernel" in sys.modules


class MetricWriter:
  """Progress bar + metrics.jsonl + optional TensorBoard for one run (see the module docstring)."""

  def __init__(self, workdir: str, *, total_steps: int, start_step: int = 0,
               progress_bar: Optional[bool] = None, tensorboard: bool = False,
               enabled: bool = True, truncate_after: Optional[int] = None):
    """`truncate_after=step` first drops the records of later steps (a resume from `step`)."""
    self.enabled = enabled
    self.path = paths.join(workdir, "metrics.jsonl")
    self._pending, self._flushed = [], time.time()  # a bucket's unwritten records
    if enabled and truncate_after is not None:
      truncate_metrics(self.path, truncate_after)
    self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                     disable=not (enabled and _bar_wanted(progress_bar)), file=sys.stderr)
    self._tb = None
    if tensorboard and enabled:
      try:
        from tensorboardX import SummaryWriter
      except ImportError as e:
        raise ValueError("config.tensorboard=True needs tensorboardX (no TensorFlow): "
                         "pip install tensorboardX==2.6.5, or set --config.tensorboard=False.") from e
      if paths.is_remote(workdir) and paths.scheme(workdir) not in ("gs", "s3"):
        raise ConfigError(f"config.tensorboard=True with workdir {workdir!r}: tensorboardX "
                          "writes local folders, gs:// and s3:// only; set "
                          "--config.tensorboard=False.")
      self._tb = SummaryWriter(paths.join(workdir, "tensorboard"))

  def write(self, step: int, scalars: dict[str, float]) -> None:
    """Appends {'step': step, **scalars} to metrics.jsonl (and TensorBoard)."""
    if not self.enabled:
      return
    line = json.dumps({"step": int(step), **scalars}) + "\n"
    if paths.is_remote(self.path):
      self._pending.append(line)
      if time.time() - self._flushed >= REMOTE_FLUSH_S:
        self.flush()
    else:
      append_text(self.path, line)
    if self._tb is not None:
      for name, value in scalars.items():
        if math.isfinite(value):
          self._tb.add_scalar(name, value, int(step))

  def train_step(self, step: int, record: dict, *, examples_per_s: float) -> None:
    """Records one training step ('train/' + each key of `record`) and advances the bar."""
    scalars = flatten_metrics({**record, "examples_per_s": examples_per_s}, "train/")
    self.write(step, scalars)
    if not self._bar.disable:
      self._bar.update(step - self._bar.n)
      self._bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                            ex_s=f"{examples_per_s:.1f}", refresh=False)

  def flush(self) -> None:
    """Writes the records kept for a bucket (one upload of the whole file)."""
    if self._pending:
      append_text(self.path, "".join(self._pending))
      self._pending = []
    self._flushed = time.time()

  def close(self) -> None:
    self.flush()
    self._bar.close()
    if self._tb is not None:
      self._tb.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
    return False
