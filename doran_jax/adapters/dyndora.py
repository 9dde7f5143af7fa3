"""DynDoRA (Mao et al. 2024): ΔW = (α/r0)·A·diag(c)·B with rank-1 components pruned during training.

Init: A ~ U(±1/sqrt(in)), B ~ N(0, 0.02²) (both random, so every component has an importance
signal), gate c = 0, so W' = W0 at step 0. The pruning schedule (doran_jax.adapters.dynrank)
runs as an optax transformation chained after the optimizer; its state lives in opt_state.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from doran_jax.adapters import dynrank, lora
from doran_jax.adapters.method import Method, Training, register

B_INIT_STD = 0.02
LEAF_AXES = {**lora.LEAF_AXES, "gate": ("rank",)}


def stored_rank(cfg) -> int:
  """r0 = ceil(init_rank_factor · rank): the components the pruning starts from."""
  return math.ceil(cfg.init_rank_factor * cfg.rank)


def init_leaves(key, w0_IxO, cfg) -> dict:
  d_in, d_out = w0_IxO.shape
  r0 = cfg.stored_rank
  key_a, key_b = jax.random.split(key)
  bound = 1.0 / jnp.sqrt(d_in)
  return {
      "lora_a": jax.random.uniform(key_a, (d_in, r0), jnp.float32, -bound, bound),
      "lora_b": B_INIT_STD * jax.random.normal(key_b, (r0, d_out), jnp.float32),
      "gate": jnp.zeros((r0,), jnp.float32),
  }


def low_rank(leaves, generated, cfg):
  del generated, cfg
  return leaves["lora_a"], leaves["gate"][:, None] * leaves["lora_b"]


def peft_factors(w0_IxO, leaves, a_IxR, b_RxO, cfg):
  del w0_IxO, cfg
  # low_rank already folds the gate into B; only live components are exported.
  live = np.asarray(leaves["gate"]) != 0
  return np.asarray(a_IxR, np.float32)[:, live], np.asarray(b_RxO, np.float32)[live], None


def peft_fields(cfg, ranks) -> dict:
  # The live rank varies per layer but the scale alpha/r0 does not: PEFT's per-layer
  # alpha_l / r_l is made equal to it (no rslora, which PEFT does not combine with patterns).
  scale = cfg.scale
  r = max(ranks.values())
  fields = {"use_dora": False, "r": r, "lora_alpha": scale * r, "use_rslora": False,
            "rank_pattern": {}, "alpha_pattern": {}}
  for name, r_l in sorted(ranks.items()):
    if r_l != r:
      fields["rank_pattern"][name] = r_l
      fields["alpha_pattern"][name] = scale * r_l
  return fields


def training(cfg, dyn_cfg, num_steps: int) -> Training:
  if dyn_cfg is None:
    raise ValueError("method 'dyndora' needs its schedule: config.dyndora (prune_start, prune_end, "
                     "prune_interval, ema_beta, eta).")
  dynrank.schedule(num_steps, dyn_cfg)  # validates the section before anything compiles
  return Training(
      transform=dynrank.pruning(cfg, dyn_cfg, num_steps),
      regularizer=lambda adapters, step: dynrank.regularizer(adapters, step, num_steps, dyn_cfg),
      summary=lambda adapters: {"live_adapter_params": dynrank.count_live_params(adapters),
                                "live_ranks": dynrank.live_ranks(adapters)})


METHOD = register(Method(name="dyndora", leaf_axes=lambda cfg: LEAF_AXES,
                         init_leaves=init_leaves, low_rank=low_rank, stored_rank=stored_rank,
                         peft_factors=peft_factors, peft_fields=peft_fields, training=training))
