"""The evaluation batch's memory, checked against the machine before training starts.

Evaluation runs after training, so an `eval_batch_size` too large for the machine used to be
killed for memory with the trained run unscored. `check_eval_batch` (run.setup calls it) refuses
such a value up front with a ConfigError naming one that fits; it does not cap it silently,
since the value is the user's and a smaller one only changes speed, never the metrics.

The estimate is rough and leans low, so only a batch that clearly cannot fit is refused. Per row
it takes the logits of a causal LM (sequence x vocabulary in float32, twice: the logits and their
log-softmax; what a large batch blows up on) plus one transformer block's working set, about
seq·(34·d + 5·heads·seq) values at 2 bytes (Korthikanti et al. 2022), scaled to model.dtype.
Nothing is allocated.

Example:
  >>> check_eval_batch(config, model_config, jax.local_devices())   # ConfigError if too large
"""

from __future__ import annotations

import math
import os
from typing import Any, Mapping, Optional, Sequence

import jax
import numpy as np

from doran_jax.errors import ConfigError

GiB = 2 ** 30


def sequence_length(model_cfg: Mapping[str, Any], data_cfg, task: str) -> int:
  """Tokens (or image patches + the class token) per eval row."""
  if task == "image_classification":
    size = data_cfg.get("image_size", None) or model_cfg.get("image_size", 224)
    return (int(size) // int(model_cfg.get("patch_size", 16))) ** 2 + 1
  return int(data_cfg.get("max_length", 128))


def eval_row_bytes(model_cfg: Mapping[str, Any], task: str, seq: int,
                   dtype: str = "float32") -> int:
  """Peak bytes one evaluation row needs (see the module docstring for the formula).

  Example:
    >>> eval_row_bytes({"hidden_size": 576, "num_attention_heads": 9, "vocab_size": 49152},
    ...                "causal_lm", 256)
  """
  hidden = int(model_cfg.get("hidden_size") or model_cfg.get("n_embd") or 0)
  heads = int(model_cfg.get("num_attention_heads") or model_cfg.get("n_head") or 1)
  itemsize = np.dtype(dtype if dtype != "bfloat16" else "float16").itemsize
  block = seq * (34 * hidden + 5 * heads * seq) * itemsize // 2
  vocab = int(model_cfg.get("vocab_size") or 0)
  logits = 2 * seq * vocab * 4 if task == "causal_lm" else 0
  return block + logits


def host_available_bytes() -> Optional[int]:
  """The host's available memory: /proc/meminfo's MemAvailable, else free physical pages."""
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except (OSError, ValueError, IndexError):
    pass
  try:
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
  except (ValueError, OSError, AttributeError):
    return None


def available_bytes(devices: Sequence[Any]) -> Optional[int]:
  """Memory free for the eval batch on `devices`: an accelerator's own (limit - in use, summed
  over the devices), else the host's (CPU devices share it); None where unknown."""
  stats = [d.memory_stats() for d in devices]
  if stats and all(s and "bytes_limit" in s for s in stats):
    return sum(int(s["bytes_limit"]) - int(s.get("bytes_in_use", 0)) for s in stats)
  return host_available_bytes()


def check_eval_batch(config, model_cfg: Optional[Mapping[str, Any]], devices: Sequence[Any],
                     available: Optional[int] = None) -> None:
  """A ConfigError when this host's share of an eval batch clearly cannot fit in memory.

  `available` overrides the measured free memory (bytes; tests).

  Raises:
    ConfigError: naming the estimate, the memory available and an eval_batch_size that fits
      (a power of two using at most half the memory: the weights and the estimate's slack
      need the rest), or asking for a shorter data.max_length when no row fits.
  """
  data_cfg = config.get("data", None)
  if model_cfg is None or data_cfg is None:
    return
  task = config.model.task
  seq = sequence_length(model_cfg, data_cfg, task)
  per_row = eval_row_bytes(model_cfg, task, seq, config.model.get("dtype", "float32"))
  batch = int(config.eval_batch_size)
  rows = math.ceil(batch / jax.process_count())
  available = available_bytes(devices) if available is None else available
  if available is None or per_row <= 0 or rows * per_row <= available:
    return
  what = (f"its {seq}x{model_cfg.get('vocab_size')} float32 logits and one block's activations"
          if task == "causal_lm" else "one block's activations")
  head = (f"eval_batch_size={batch} needs about {rows * per_row / GiB:,.1f} GiB for one "
          f"evaluation batch ({per_row / 2 ** 20:,.1f} MiB a row of {seq}: {what}), but "
          f"{available / GiB:,.1f} GiB is available here, so evaluation would run out of memory "
          "after training.")
  fits = (available // 2) // per_row * jax.process_count()
  if fits < 1:
    raise ConfigError(f"{head} Not even one row fits: lower data.max_length.")
  raise ConfigError(f"{head} Set --config.eval_batch_size={2 ** int(math.log2(fits))} (or lower); "
                    "it changes only the speed of evaluation, not its result.")
