"""Per-output-unit column norms, shared by the weight-decomposed methods."""

import jax.numpy as jnp

from doran_jax import quant


def column_norm(w_IxO, eps: float):
  """||w||_2 over the input axis, in float32, floored at `eps` (all-zero columns stay finite).

  A quant.QuantizedKernel gives the norm of its dequantised float32 values, kept since load.
  """
  if quant.is_quantized(w_IxO):
    return jnp.sqrt(jnp.maximum(jnp.asarray(w_IxO.col_sq_norm, jnp.float32), eps * eps))
  w = w_IxO.astype(jnp.float32)
  # Floor the square before the root: max(sqrt(s), eps) would send 0·inf = NaN back through
  # sqrt at an all-zero column whenever the norm is not detached (DoRAN's detach_norm=False).
  return jnp.sqrt(jnp.maximum(jnp.sum(w * w, axis=0), eps * eps))
