"""Per-output-unit column norms, shared by the weight-decomposed methods."""

import jax.numpy as jnp


def column_norm(w_IxO, eps: float):
  """||w||_2 over the input axis, in float32, floored at `eps` (all-zero columns stay finite)."""
  w = w_IxO.astype(jnp.float32)
  return jnp.maximum(jnp.sqrt(jnp.sum(w * w, axis=0)), eps)
