"""Optimizer: AdamW with warmup + decay and clipping; frozen leaves guarded by optax.partition.

Gradients are taken with respect to the trainable tree only; `freeze` regexes additionally route
matching trainable leaves to `optax.set_to_zero` (optax.masked alone would pass their updates through).
"""

from __future__ import annotations

import re
from typing import Optional, Sequence

import jax
import optax
from absl import logging

from doran_jax.targets import SEP

OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("linear", "cosine", "constant")


def method_lr(optim_cfg, method: str) -> Optional[float]:
  """The lr a method trains at: optim.lr when set, else its optim.lr_by_method entry (or None).

  Example:
    >>> method_lr(sst2.get_config().optim, "lora")
  """
  if optim_cfg.get("lr", None) is not None:
    return optim_cfg.get("lr")
  table = optim_cfg.get("lr_by_method", None) or {}
  return table.get(method, None)


def warmup_steps(optim_cfg, num_steps: int) -> int:
  """optim.warmup_ratio · num_steps (truncated, as transformers' schedulers) when the ratio is
  set, else optim.warmup_steps; at most num_steps - 1."""
  ratio = optim_cfg.get("warmup_ratio", None)
  warmup = int(ratio * num_steps) if ratio is not None else int(optim_cfg.warmup_steps)
  return min(warmup, max(num_steps - 1, 0))


def learning_rate_schedule(optim_cfg, num_steps: int) -> optax.Schedule:
  """Linear warmup to `lr`, then 'linear' decay to 0, 'cosine' decay, or 'constant'."""
  if optim_cfg.lr is None:
    raise ValueError("optim.lr is unset; pass the config through config_lib.resolved (run.setup "
                     "does) to take it from optim.lr_by_method, or set lr=....")
  warmup = warmup_steps(optim_cfg, num_steps)
  decay_steps = max(num_steps - warmup, 1)
  if optim_cfg.schedule == "linear":
    decay = optax.linear_schedule(optim_cfg.lr, 0.0, decay_steps)
  elif optim_cfg.schedule == "cosine":
    decay = optax.cosine_decay_schedule(optim_cfg.lr, decay_steps)
  elif optim_cfg.schedule == "constant":
    decay = optax.constant_schedule(optim_cfg.lr)
  else:
    raise ValueError(f"unknown optim.schedule {optim_cfg.schedule!r}; choose linear, cosine or constant.")
  if warmup == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, optim_cfg.lr, warmup), decay], [warmup])


def _path(key_path) -> str:
  return SEP.join(str(getattr(k, "key", getattr(k, "idx", k))) for k in key_path)


def freeze_labels(trainable, freeze: Sequence[str]):
  """'train' / 'freeze' label per trainable leaf; every frozen match is logged."""
  regexes = [re.compile(r) for r in freeze]
  hits = {r.pattern: 0 for r in regexes}

  def label(key_path, _):
    path = _path(key_path)
    for r in regexes:
      if r.fullmatch(path):
        hits[r.pattern] += 1
        logging.info("freeze: %s (matched %r)", path, r.pattern)
        return "freeze"
    return "train"

  labels = jax.tree_util.tree_map_with_path(label, trainable)
  unused = [p for p, n in hits.items() if n == 0]
  if unused:
    raise ValueError(f"freeze regexes {unused} match no trainable parameter; fix or remove them.")
  return labels


def make_optimizer(optim_cfg, num_steps: int, trainable, freeze: Sequence[str] = (), *,
                   after: Optional[optax.GradientTransformation] = None):
  """AdamW (or SGD) with schedule and global-norm clipping over the trainable tree.

  `after` (a method's training-time transformation, e.g. DynDoRA's pruning) is chained after
  the optimizer over the whole trainable tree; its state lives in the optimizer state.

  Example:
    >>> tx = make_optimizer(config.optim, 1000, trainable)
    >>> opt_state = tx.init(trainable)
  """
  schedule = learning_rate_schedule(optim_cfg, num_steps)
  if optim_cfg.name == "adamw":
    # Decay only matrices: magnitudes, taus, gates, biases and norms keep their scale.
    base = optax.adamw(schedule, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
                       weight_decay=optim_cfg.weight_decay,
                       mask=lambda p: jax.tree_util.tree_map(lambda x: x.ndim >= 2, p))
  elif optim_cfg.name == "sgd":
    base = optax.sgd(schedule, momentum=optim_cfg.get("momentum", 0.9))
  else:
    raise ValueError(f"unknown optim.name {optim_cfg.name!r}; choose adamw or sgd.")
  chain = []
  if optim_cfg.clip_norm:
    chain.append(optax.clip_by_global_norm(optim_cfg.clip_norm))
  chain.append(base)
  tx = optax.chain(*chain)
  labels = freeze_labels(trainable, freeze)
  tx = optax.partition({"train": tx, "freeze": optax.set_to_zero()}, labels)
  if after is not None:
    tx = optax.chain(tx, after)
  return tx, schedule
