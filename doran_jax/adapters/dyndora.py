"""DynDoRA (Mao et al. 2024): ΔW = (α/r0)·A·diag(c)·B with rank-1 components pruned during training.

Init: A ~ U(±1/sqrt(in)), B ~ N(0, 0.02²) (both random, so every component has an importance
signal), gate c = 0, so W' = W0 at step 0. The pruning schedule lives in doran_jax.dynrank.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEEDS_NORM = False
B_INIT_STD = 0.02


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


def gain(norm_O, leaves, cfg, key, train):
  del norm_O, leaves, cfg, key, train
  return None
