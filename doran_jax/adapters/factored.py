"""Factored mode: run the unmodified model with adapted layers computed as x·W0 plus a low-rank path.

  LoRA:        y = x·W0 + s·(drop(x)·A)·B + bias
  DoRA/DoRAN:  y = g ⊙ (x·W0 + s·(x·A)·B) + bias,   g = m / (n [+ ξ])          (no dropout)
               y = x·W0 + bias + (g − 1) ⊙ (drop(x)·W0) + g ⊙ s·(drop(x)·A)·B   (dropout, train)

The backward pass never builds a full-size weight gradient for an adapted kernel: without
dropout the layer runs x·(W0 + s·A·B) in one dot whose custom VJP returns A's and B's gradients
in low-rank form (`_updated_matmul`; merged mode's autodiff builds xᵀ·dy, one (in, out) matmul
over every token per kernel, and projects it). In float32 the norm n is read off the V = W0 + s·A·B
that dot builds anyway; with dropout, in other dtypes or on a quantised W0 it comes from the
column-norm identity
  n² = ‖W0‖² + 2s·Σ_r (W0ᵀA)∘Bᵀ + s²·diag(Bᵀ(AᵀA)B),
which needs (out, r) temporaries. Dropout follows PEFT exactly
(peft.tuners.lora DoRA variant): the base layer's output sees the clean input, DoRA's rescaling
of it and the low-rank path see the dropped input (one extra x·W0 matmul, as in PEFT). Layers
are swapped in with `flax.linen.intercept_methods`, so the model code stays untouched and the
adapters stay a pure pytree input.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from flax import linen as nn

from doran_jax import dropout as dropout_lib
from doran_jax import quant
from doran_jax.adapters import core
from doran_jax.adapters import norms
from doran_jax.adapters import method as method_registry
from doran_jax.adapters.config import AdapterConfig
from doran_jax.errors import ConfigError
from doran_jax.targets import SEP

DROPOUT_STREAM = 2**31 - 1


def column_norm_factored(w0_IxO, a_IxR, b_RxO, scale: float, eps: float):
  """‖W0 + s·A·B‖ per output unit without materialising the sum (float32).

  A quantised W0 (quant.QuantizedKernel) contributes its dequantised values: ‖W0‖² kept since
  load, and the cross term AᵀW0 through quant.matmul (dequantised in float32, no copy kept).
  """
  a = a_IxR.astype(jnp.float32)
  b = b_RxO.astype(jnp.float32)
  if quant.is_quantized(w0_IxO):
    w0_sq_O = jnp.asarray(w0_IxO.col_sq_norm, jnp.float32)
    cross_O = jnp.sum(quant.matmul(a.T, w0_IxO) * b, axis=0)
  else:
    w0 = w0_IxO.astype(jnp.float32)
    w0_sq_O = jnp.sum(w0 * w0, axis=0)
    cross_O = jnp.sum((w0.T @ a) * b.T, axis=1)
  gram_RxR = a.T @ a
  ab_sq_O = jnp.sum(b * (gram_RxR @ b), axis=0)
  sq_O = w0_sq_O + 2.0 * scale * cross_O + scale**2 * ab_sq_O
  # Floored before the root, as in column_norm: finite gradients at all-zero columns.
  return jnp.sqrt(jnp.maximum(sq_O, eps * eps))


def layer_factors(params, adapters, cfg: AdapterConfig, *, rng=None, train=False) -> dict:
  """{module path tuple: (A, B, gain_of or None, transposed, index)} for every adapted kernel.

  `gain_of(norm_O)` gives the method's per-output gain for the layer's column norm, which the
  layer computes where it holds the kernel (`_column_norm`).
  """
  method = method_registry.get(cfg.method)
  out = {}
  for i, (t, leaves, a_IxR, b_RxO) in enumerate(core.target_factors(params, adapters, cfg)):
    gain_of = None
    if method.needs_norm:
      key = core.target_key(rng, i)
      gain_of = functools.partial(_gain, method.gain, leaves, cfg, key, train)
    out[tuple(t.module_path.split(SEP))] = (a_IxR, b_RxO, gain_of, t.transposed, i)
  return out


def _gain(gain_fn, leaves, cfg, key, train, norm_O):
  return gain_fn(norm_O, leaves, cfg, key, train)


def _column_norm(kernel, a_IxR, b_RxO, transposed: bool, cfg: AdapterConfig, dtype, fused: bool):
  """‖W0 + s·A·B‖ per output unit (float32) for a layer computing in `dtype`.

  On the fused path (`_updated_matmul`, no dropout) in float32 on a float kernel this is the
  norm of V = W0 + s·A·B written with the same ops as `_updated_matmul`'s forward, so XLA builds
  V once for both and the norm is one more read of it; the column-norm identity
  (`column_norm_factored`) would read W0 twice more (its squares, then W0ᵀA) per adapted kernel
  and step. Elsewhere (dropout, another dtype, a quantised kernel) V is not built in float32, and
  the identity gives the norm from (out, r) temporaries.
  """
  if fused and jnp.dtype(dtype) == jnp.float32 and not quant.is_quantized(kernel):
    kernel = jnp.asarray(kernel, dtype)
    w0_IxO = kernel.T if transposed else kernel
    ab_IxO = a_IxR.astype(dtype) @ b_RxO.astype(dtype)
    v_IxO = w0_IxO + jnp.asarray(cfg.scale, w0_IxO.dtype) * ab_IxO
    return norms.column_norm(v_IxO, cfg.norm_eps)
  w0_IxO = kernel.T if transposed else kernel
  return column_norm_factored(w0_IxO, a_IxR, b_RxO, cfg.scale, cfg.norm_eps)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _updated_matmul(x, w0_IxO, a_IxR, b_RxO, scale: float):
  """x·(W0 + s·A·B): one full-size dot forward and one backward (for dx).

  Plain autodiff of the same expression would build the full-size xᵀ·dy for (W0 + s·A·B) and
  project it onto A and B; here A's and B's gradients stay low-rank, dA = s·xᵀ(dy·Bᵀ) and
  dB = s·(x·A)ᵀdy. W0's gradient xᵀ·dy is returned too (exact for any caller); XLA drops it
  when W0 is frozen.
  """
  return _updated_matmul_fwd(x, w0_IxO, a_IxR, b_RxO, scale)[0]


def _updated_matmul_fwd(x, w0_IxO, a_IxR, b_RxO, scale):
  v_IxO = w0_IxO + jnp.asarray(scale, w0_IxO.dtype) * (a_IxR @ b_RxO)
  return x @ v_IxO, (x, v_IxO, a_IxR, b_RxO)


def _updated_matmul_bwd(scale, res, dy):
  x, v_IxO, a_IxR, b_RxO = res
  lead = tuple(range(x.ndim - 1))

  def over_tokens(u, w):   # uᵀ·w summed over every leading (batch, token) axis
    return jax.lax.dot_general(u, w, ((lead, lead), ((), ())))

  s = jnp.asarray(scale, dy.dtype)
  dx = dy @ v_IxO.T
  # (dy·Bᵀ)ᵀ·x, then the (r, in) result transposed: as xᵀ·(dy·Bᵀ) XLA:CPU copied every adapted
  # layer's (tokens, in) input transposed in the forward pass to feed this dot.
  da_IxR = over_tokens(dy @ b_RxO.T, x).T * s
  db_RxO = over_tokens(x @ a_IxR, dy) * s
  return dx, over_tokens(x, dy), da_IxR, db_RxO


_updated_matmul.defvjp(_updated_matmul_fwd, _updated_matmul_bwd)


def _adapted_dense(module, x, factors, cfg: AdapterConfig, dropout_key, train: bool):
  a_IxR, b_RxO, gain_of, transposed, _ = factors
  dtype = getattr(module, "dtype", None) or x.dtype
  kernel = module.get_variable("params", "kernel")
  x = jnp.asarray(x, dtype)
  dropped = train and cfg.dropout > 0
  g_O = None
  if gain_of is not None:
    g_O = gain_of(_column_norm(kernel, a_IxR, b_RxO, transposed, cfg, dtype, fused=not dropped))
  if not dropped and not quant.is_quantized(kernel):
    kernel = jnp.asarray(kernel, dtype)
    w0 = kernel.T if transposed else kernel
    y = _updated_matmul(x, w0, a_IxR.astype(dtype), b_RxO.astype(dtype), cfg.scale)
    if g_O is not None:
      y = y * g_O.astype(dtype)
    if module.has_variable("params", "bias"):
      y = y + jnp.asarray(module.get_variable("params", "bias"), dtype)
    return y
  if quant.is_quantized(kernel):
    # Dequantised on the fly in the compute dtype; the backward pass dequantises again.
    times_w0 = lambda v: quant.matmul(v, kernel)  # noqa: E731
  else:
    kernel = jnp.asarray(kernel, dtype)
    w0 = kernel.T if transposed else kernel
    times_w0 = lambda v: v @ w0  # noqa: E731
  base = times_w0(x)
  x_lora = x
  if dropped:
    if dropout_key is None:
      raise ValueError("adapter dropout > 0 in train mode needs an rng: adapted_apply(..., rng=key).")
    x_lora = dropout_lib.apply(x, dropout_key, cfg.dropout)
  # Adapter weights, norms and gains are float32; activation-sized tensors stay in the compute
  # dtype (bf16 on accelerators), as the base path does.
  low = ((x_lora @ a_IxR.astype(dtype)) @ b_RxO.astype(dtype)) * jnp.asarray(cfg.scale, dtype)
  if g_O is None:
    y = base + low
  elif dropped:
    g = g_O.astype(dtype)
    y = base + (g - 1) * times_w0(x_lora) + g * low
  else:
    y = (base + low) * g_O.astype(dtype)
  if module.has_variable("params", "bias"):
    y = y + jnp.asarray(module.get_variable("params", "bias"), dtype)
  return y


def adapted_apply(apply_fn, params, adapters, cfg: AdapterConfig, batch, *,
                  rng: Optional[jax.Array] = None, train: bool = False,
                  dropout_rng: Optional[jax.Array] = None):
  """Calls `apply_fn(params, batch, train=train, rng=dropout_rng)` (e.g. `Backbone.apply`) with
  every adapted layer computed in factored form.

  Equals `apply_fn(apply_adapters(params, adapters, cfg, rng=rng, train=train), batch, ...)` when
  cfg.dropout == 0 (up to float rounding). `rng` drives DoRAN's noise and adapter dropout;
  `dropout_rng` the model's own dropout.

  Example:
    >>> logits = adapted_apply(bb.apply, params, adapters, cfg, batch, rng=key, train=True)
  """
  if not cfg.has_adapters:
    return apply_fn(params, batch, train=train, rng=dropout_rng)
  # Noise keys match apply_adapters(rng=rng); dropout draws from a separate fold of the same key.
  key_drop = None if rng is None else jax.random.fold_in(rng, DROPOUT_STREAM)
  factors = layer_factors(params, adapters, cfg, rng=rng, train=train)
  seen = set()

  def interceptor(next_fun, args, kwargs, context):
    mod = context.module
    if context.method_name != "__call__" or mod.scope is None:
      return next_fun(*args, **kwargs)
    path = tuple(mod.scope.path)
    if path not in factors:
      return next_fun(*args, **kwargs)
    seen.add(path)
    f = factors[path]
    key = None if key_drop is None else jax.random.fold_in(key_drop, f[4])
    return _adapted_dense(mod, args[0], f, cfg, key, train)

  with nn.intercept_methods(interceptor):
    out = apply_fn(params, batch, train=train, rng=dropout_rng)
  missing = set(factors) - seen
  if missing:
    raise ConfigError(f"factored mode: adapted kernels {sorted(SEP.join(p) for p in missing)[:4]} "
                      "were never called by the model; use adapter.mode='merged' for this model.")
  return out
