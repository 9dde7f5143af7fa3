"""DoRA (Liu et al. 2024): W' = m ⊙ V / ||V||, V = W0 + s·A·B, norm per output unit, detached.

Init: m = ||W0|| per output unit, so W' = W0 at step 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from doran_jax.adapters import lora
from doran_jax.adapters.method import Method, register
from doran_jax.adapters.norms import column_norm
from doran_jax.errors import CheckpointError

LEAF_AXES = {**lora.LEAF_AXES, "magnitude": ("out",)}


def init_leaves(key, w0_IxO, cfg) -> dict:
  leaves = lora.init_leaves(key, w0_IxO, cfg)
  leaves["magnitude"] = column_norm(w0_IxO, cfg.norm_eps)
  return leaves


low_rank = lora.low_rank


def gain(norm_O, leaves, cfg, key, train):
  del cfg, key, train
  # The paper's §4.3: the norm is treated as a constant in the backward pass.
  return leaves["magnitude"] / jax.lax.stop_gradient(norm_O)


def peft_magnitude(w0_IxO, leaves, a_IxR, b_RxO, cfg, gain_fn):
  """(B with all-zero columns of V revived, PEFT's magnitude m = g·‖V‖) for norm-based methods.

  PEFT divides by the plain norm; we divide by the eps-floored one (plus τ for doran), so the
  exported magnitude is our gain times the plain norm.
  """
  a_IxR = np.asarray(a_IxR, np.float32)
  b_RxO = np.asarray(b_RxO, np.float32)
  v_IxO = jnp.asarray(w0_IxO, jnp.float32) + cfg.scale * (jnp.asarray(a_IxR) @ b_RxO)
  n_raw = column_norm(v_IxO, 0.0)
  m_O = gain_fn(jnp.maximum(n_raw, cfg.norm_eps), leaves, cfg, None, False) * n_raw
  dead = np.asarray(n_raw) == 0
  if dead.any():
    b_RxO = _revive_dead_columns(b_RxO, a_IxR, dead)
  return a_IxR, b_RxO, m_O, n_raw


def _revive_dead_columns(b_RxO, a_IxR, dead_O):
  """Gives all-zero columns of V a nonzero ΔW so PEFT's m/‖V‖ is 0/x, not 0/0.

  Our output for such a unit is 0 (its gain multiplies a zero column); PEFT computes
  m/‖V‖·V with no floor, so we export m = 0 there and make V's column nonzero through B.
  """
  k = int(np.argmax(np.linalg.norm(a_IxR, axis=0)))
  if not np.any(a_IxR[:, k]):
    raise CheckpointError(
        f"{int(dead_O.sum())} output units have an all-zero column of W0 + s·A·B and lora_a is "
        "all zero too: PEFT's DoRA would divide 0 by 0 there. Train the adapter (or export the "
        "merged model) instead.")
  b_RxO = b_RxO.copy()
  b_RxO[k, dead_O] = 1.0
  return b_RxO


def peft_factors(w0_IxO, leaves, a_IxR, b_RxO, cfg):
  a_IxR, b_RxO, m_O, n_raw = peft_magnitude(w0_IxO, leaves, a_IxR, b_RxO, cfg, gain)
  # Keep m bit-exact where the floor is inactive, so ours -> PEFT -> ours is the identity.
  m_O = jnp.where(n_raw >= cfg.norm_eps, leaves["magnitude"].astype(jnp.float32), m_O)
  return a_IxR, b_RxO, np.asarray(m_O, np.float32)


def peft_fields(cfg, ranks) -> dict:
  return {**lora.peft_fields(cfg, ranks), "use_dora": True}


METHOD = register(Method(name="dora", leaf_axes=lambda cfg: LEAF_AXES, init_leaves=init_leaves,
                         low_rank=low_rank, gain=gain, peft_factors=peft_factors,
                         peft_fields=peft_fields))
