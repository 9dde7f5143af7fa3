"""LoRA (Hu et al. 2021): W' = W0 + s·A·B. Init: A ~ U(±1/sqrt(in)), B = 0."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from doran_jax.adapters.method import Method, register

LEAF_AXES = {"lora_a": ("in", "rank"), "lora_b": ("rank", "out")}


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


def peft_factors(w0_IxO, leaves, a_IxR, b_RxO, cfg):
  del w0_IxO, leaves, cfg
  return np.asarray(a_IxR, np.float32), np.asarray(b_RxO, np.float32), None


def peft_fields(cfg, ranks) -> dict:
  del ranks
  return {"use_dora": False, "r": cfg.rank, "lora_alpha": cfg.alpha, "use_rslora": cfg.rslora}


METHOD = register(Method(name="lora", leaf_axes=lambda cfg: LEAF_AXES, init_leaves=init_leaves,
                         low_rank=low_rank, peft_factors=peft_factors, peft_fields=peft_fields))
