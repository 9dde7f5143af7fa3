"""Shared config building for configs/*.py (big_vision style: small Python files, locked dicts).

`configs/<exp>.py:get_config(arg)` starts from `base_config()`, sets what the experiment needs and
applies `arg` ("method=dora,rank=16") with `apply_arg`. Locked: a typo in an override is an error.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from doran_jax.adapters.config import AdapterConfig

# Short names accepted in `--config configs/x.py:name=value,...`.
ARG_KEYS = {
    "method": "adapter.method", "rank": "adapter.rank", "alpha": "adapter.alpha",
    "targets": "adapter.targets", "mode": "adapter.mode", "lr": "optim.lr", "seed": "seed",
    "steps": "num_steps", "epochs": "num_epochs", "batch": "batch_size", "workdir": "workdir",
    "task": "data.task", "path": "data.path", "data_dir": "data.data_dir", "limit": "data.limit",
    "noise_std": "adapter.noise_std", "model": "model.name", "dtype": "model.dtype",
    "quantize": "model.quantize",
}


def adapter_defaults(**overrides) -> ml_collections.ConfigDict:
  d = AdapterConfig().to_dict()
  d.pop("transposed")  # detected from the model at load time
  d.update(overrides)
  return ml_collections.ConfigDict(d)


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.workdir = "runs/default"
  # num_labels=0: taken from the data set.
  c.model = ml_collections.ConfigDict(dict(
      name="minilm", task="classification", num_labels=0, dtype="float32", param_dtype="float32",
      tiny="", tokenizer="", remat=False, config_overrides={},
      # Memory-lean attention and GELU on CPU (models/modeling/fused_ops.py); same maths.
      fused_layers=True,
      # Frozen Dense kernels stored 'int8' | 'nf4' (doran_jax/quant.py; needs adapter.mode=
      # 'factored'); double_quant: nf4's block scales in 8 bits (QLoRA's double quantisation).
      quantize="none", double_quant=False))
  c.adapter = adapter_defaults()
  c.head = config_dict.placeholder(str)   # None -> the task's default head regex
  c.freeze = ()                            # regexes of trainable leaves to keep fixed (logged)
  c.optim = ml_collections.ConfigDict(dict(
      name="adamw", lr=1e-3, warmup_steps=50, schedule="linear", weight_decay=0.0, b1=0.9,
      b2=0.999, eps=1e-8, clip_norm=1.0, accum_steps=1))
  c.batch_size = 32
  c.eval_batch_size = 128
  c.num_steps = 0          # 0 -> from num_epochs
  c.num_epochs = 1.0
  c.log_every = 50        # a plain progress line every N steps (also in batch logs)
  c.progress_bar = config_dict.placeholder(bool)   # None: a tqdm bar on a terminal or notebook
  c.tensorboard = False    # True: also write <workdir>/tensorboard (needs tensorboardX)
  c.checkpoint = ml_collections.ConfigDict(dict(every=500, max_to_keep=2))
  c.export = ml_collections.ConfigDict(dict(merged=False))
  c.baselines = ()         # ("majority", "frozen") for classification
  # Commonsense accuracy by greedy generation at the end of causal_lm runs.
  c.generate = ml_collections.ConfigDict(dict(enabled=False, max_new_tokens=32, limit_per_task=0))
  # DynDoRA's schedule (fractions of num_steps) and variance regulariser weight.
  c.dyndora = ml_collections.ConfigDict(dict(
      prune_start=0.15, prune_end=0.5, prune_interval=10, ema_beta=0.9, eta=0.1))
  c.mesh = "data:-1,fsdp:1,model:1"   # axis:size, one size may be -1 (the remaining devices)
  c.sharding_rules = "replicated"
  c.distributed = "auto"
  return c


def apply_arg(config: ml_collections.ConfigDict, arg, aliases=None) -> ml_collections.ConfigDict:
  """Applies 'k=v,k=v' (short names in ARG_KEYS, `aliases`, or dotted paths), then locks.

  Example:
    >>> apply_arg(base_config(), "method=dora,rank=16").adapter.rank
    16
  """
  names = {**ARG_KEYS, **(aliases or {})}
  if arg:
    for item in str(arg).split(","):
      if "=" not in item:
        raise ValueError(f"config argument {item!r} must look like name=value; known names: "
                         f"{', '.join(sorted(names))}")
      key, value = (s.strip() for s in item.split("=", 1))
      path = names.get(key, key)
      parent = config
      for part in path.split(".")[:-1]:
        parent = parent[part]
      leaf = path.split(".")[-1]
      if leaf not in parent:
        raise ValueError(f"unknown config argument {key!r}; known names: {', '.join(sorted(names))}")
      current = parent[leaf]
      parent[leaf] = _parse(value, current)
  config.lock()
  return config


def _parse(value: str, current):
  if isinstance(current, bool):
    return value.lower() in ("1", "true", "yes")
  if isinstance(current, int):
    return int(value)
  if isinstance(current, float):
    return float(value)
  return value
