"""LoRA (Hu et al. 2021): W' = W0 + s·A·B. Init: A ~ U(±1/sqrt(in)), B = 0."""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEEDS_NORM = False


def init_factors(key, d_in: int, d_out: int, rank: int, dtype=jnp.float32) -> dict:
  bound = 1.0 / jnp.sqrt(d_in)
  return {
      "lora_a": jax.random.uniform(key, (d_in, rank), dtype, -bound, bound),
      "lora_b": jnp.zeros((rank, d_out), dtype),
  }


def init_leaves(key, w0_IxO, cfg) -> dict:
  d_in, d_out = w0_IxO.shape
  return init_factors(key, d_in, d_out, cfg.stored_rank)


def low_rank(leaves, generated, cfg):
  del generated, cfg
  return leaves["lora_a"], leaves["lora_b"]


def gain(norm_O, leaves, cfg, key, train):
  del norm_O, leaves, cfg, key, train
  return None
