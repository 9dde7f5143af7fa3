"""DoRA (Liu et al. 2024): W' = m ⊙ V / ||V||, V = W0 + s·A·B, norm per output unit, detached.

Init: m = ||W0|| per output unit, so W' = W0 at step 0.
"""

from __future__ import annotations

import jax

from doran_jax.adapters import lora
from doran_jax.adapters.norms import column_norm

NEEDS_NORM = True


def init_leaves(key, w0_IxO, cfg) -> dict:
  leaves = lora.init_leaves(key, w0_IxO, cfg)
  leaves["magnitude"] = column_norm(w0_IxO, cfg.norm_eps)
  return leaves


low_rank = lora.low_rank


def gain(norm_O, leaves, cfg, key, train):
  del cfg, key, train
  # The paper's §4.3: the norm is treated as a constant in the backward pass.
  return leaves["magnitude"] / jax.lax.stop_gradient(norm_O)
