"""Memory-lean attention and exact GELU: custom VJPs that recompute instead of storing.

Plain autodiff of softmax attention keeps several (B, H, T, S) float32 tensors per layer for the
backward pass (scores or probabilities, the dropout mask, the dropped probabilities), and exact
GELU keeps its erf pieces at (B, T, 4d): on MiniLM at batch 32 x 128 tokens that is most of a
CPU training step's memory. Here

  attention:  keeps q, k, v, the output, the row max and row sum of the softmax (B, K, G, T, 1),
              the (small, broadcast) boolean masks and the dropout mask's 64-bit seed, and
              recomputes the probabilities and the dropout mask (doran_jax.dropout) in the
              backward pass (FlashAttention's recomputation, untiled: encoder sequences fit),
              with D = rowsum(dO ∘ O) for the softmax backward;
  gelu:       x·Φ(x) with Φ from erf (PyTorch's form), keeping only x.

The forward shares `scores` and `weighted_values` with `layers.dot_product_attention`'s plain
path, so outputs agree to the last bit or so and gradients to float rounding
(tests/test_fused.py). Both run their dots head-major, (B, K, G·T, D), so XLA:CPU writes every
(B, K, G, T, S) tensor in the layout its consumers read.

Example:
  >>> out_BxTxKxGxD = attention(q_BxTxKxGxD, k_BxSxKxD, v_BxSxKxD, None, mask, None,
  ...                           0.125, None, 0.0)
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from doran_jax import dropout as dropout_lib

_SQRT_HALF = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
# Masked scores get the most negative float32 rather than -inf: a row with every key masked
# (a padded query) then softmaxes to uniform weights instead of NaN, as PyTorch's eager path does.
_MASKED = float(jnp.finfo(jnp.float32).min)


def _after(x, cotangent):
  """x, made to depend on the cotangent so the recomputation stays in the backward pass.

  XLA would otherwise merge it with the forward's identical ops (CSE) or hoist it there, and keep
  the large intermediates alive after all; XLA:CPU drops optimization barriers before CSE. A
  float multiply by zero is not folded (NaN semantics), so the tie survives optimisation; a
  non-finite cotangent makes the whole gradient non-finite, which the trainer rejects anyway.
  """
  return x + (cotangent.reshape(-1)[0] * 0).astype(x.dtype)


# ------------------------------------------------------------------------------------- GELU

def _gelu(x):
  # The same ops as layers.gelu, so lean and plain outputs are bit-identical.
  return x * (0.5 * (1.0 + jax.lax.erf(x * jnp.asarray(_SQRT_HALF, x.dtype))))


@jax.custom_vjp
def gelu(x):
  """Exact GELU x·Φ(x), Φ(x) = (1 + erf(x/√2))/2; the backward keeps x only."""
  return _gelu(x)


def _gelu_fwd(x):
  return _gelu(x), x


def _gelu_bwd(x, dy):
  xf = _after(x, dy).astype(jnp.float32)
  cdf = 0.5 * (1.0 + jax.lax.erf(xf * _SQRT_HALF))
  pdf = _INV_SQRT_2PI * jnp.exp(-0.5 * xf * xf)
  return ((dy.astype(jnp.float32) * (cdf + xf * pdf)).astype(x.dtype),)


gelu.defvjp(_gelu_fwd, _gelu_bwd)


# -------------------------------------------------------------------------------- attention

def _dot(a, b, contract_a, contract_b):
  """Batched over the two leading axes (B, K), float32 accumulation."""
  return jax.lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((0, 1), (0, 1))),
                             preferred_element_type=jnp.float32)


def _heads_major(q_BxTxKxGxD):
  """(B, T, K, G, D) -> (B, K, G·T, D): queries of a key/value head as one matrix."""
  b, t, k, g, d = q_BxTxKxGxD.shape
  return jnp.transpose(q_BxTxKxGxD, (0, 2, 3, 1, 4)).reshape(b, k, g * t, d)


def _kv_major(x_BxSxKxD):
  """(B, S, K, D) -> (B, K, S, D)."""
  return jnp.transpose(x_BxSxKxD, (0, 2, 1, 3))


def scores(q_BxTxKxGxD, k_BxSxKxD, bias, mask, scale, softcap):
  """Masked float32 scores (B, K, G, T, S) and tanh(raw / cap) (for softcap's derivative).

  The dot runs head-major, (B, K, G·T, D)·(B, K, S, D)ᵀ, so it writes the scores in the layout
  the softmax reads: written as one einsum over (B, T, K, G, D), XLA:CPU computed K·Qᵀ and
  transposed every (B, H, T, S) tensor it produced (~7% of a MiniLM CPU training step).
  """
  b, t, kh, g, _ = q_BxTxKxGxD.shape
  s = _dot(_heads_major(q_BxTxKxGxD), _kv_major(k_BxSxKxD), 3, 3)
  s = s.reshape(b, kh, g, t, -1) * jnp.float32(scale)
  tanh = None
  if softcap:
    tanh = jnp.tanh(s / softcap)
    s = softcap * tanh
  if bias is not None:
    s = s + bias.astype(jnp.float32)
  if mask is not None:
    s = jnp.where(mask, s, _MASKED)
  return s, tanh


def weighted_values(p_BxKxGxTxS, v_BxSxKxD):
  """Σ_s p·v -> (B, T, K, G, D) in v's dtype (p cast to it first), head-major like `scores`."""
  b, kh, g, t, s = p_BxKxGxTxS.shape
  p = p_BxKxGxTxS.reshape(b, kh, g * t, s).astype(v_BxSxKxD.dtype)
  o = _dot(p, _kv_major(v_BxSxKxD), 3, 2).reshape(b, kh, g, t, -1)
  return jnp.transpose(o, (0, 3, 1, 2, 4)).astype(v_BxSxKxD.dtype)


def _dropped(p, keep, rate):
  """PyTorch's dropout on probabilities: kept ones scaled by 1 / (1 - rate), the rest 0."""
  return p if keep is None else jnp.where(keep, p / (1.0 - rate), 0.0)


def _unbroadcast(x, shape):
  """Sums x down to `shape` (the cotangent of an input broadcast up to x's shape)."""
  lead = x.ndim - len(shape)
  axes = tuple(range(lead)) + tuple(lead + i for i, n in enumerate(shape) if n == 1
                                    and x.shape[lead + i] != 1)
  return jnp.sum(x, axis=axes, keepdims=True).reshape(shape)


def _keep(drop_seed, shape, rate):
  """The dropout mask (True = kept) for a seed, or None without dropout."""
  return None if drop_seed is None else dropout_lib.keep_mask_from_seed(drop_seed, 1.0 - rate,
                                                                         shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def attention(q_BxTxKxGxD, k_BxSxKxD, v_BxSxKxD, bias, mask, drop_seed, scale, softcap, rate):
  """softmax(cap·tanh(q·kᵀ·scale / cap) + bias, masked) with dropout, times v; grouped heads.

  Args:
    q_BxTxKxGxD: queries, heads grouped as (K key/value heads, G queries each).
    k_BxSxKxD, v_BxSxKxD: keys and values.
    bias: float, broadcastable to (B, K, G, T, S), or None.
    mask: bool, broadcastable to (B, K, G, T, S), True = attend; or None.
    drop_seed: `doran_jax.dropout.seed(key)` of the dropout mask over (B, K, G, T, S), or None
      for no dropout.
    scale: score scale (static).
    softcap: logit soft cap or None (static).
    rate: dropout rate the kept probabilities are rescaled by (static).

  Returns:
    (B, T, K, G, D) outputs in v's dtype.
  """
  return _attention_fwd(q_BxTxKxGxD, k_BxSxKxD, v_BxSxKxD, bias, mask, drop_seed, scale,
                        softcap, rate)[0]


def _attention_fwd(q, k, v, bias, mask, drop_seed, scale, softcap, rate):
  s, _ = scores(q, k, bias, mask, scale, softcap)
  keep = _keep(drop_seed, s.shape, rate)
  # jax.nn.softmax's ops: exp(s - max) / sum.
  m = jnp.max(s, axis=-1, keepdims=True)
  e = jnp.exp(s - m)
  l = jnp.sum(e, axis=-1, keepdims=True)
  p = _dropped(e / l, keep, rate)
  o = weighted_values(p, v)
  # m and l rather than their log-sum-exp: m + log(l) loses log(l) next to a masked row's
  # -3.4e38, and the recomputed e / l is then bit-identical to the forward's.
  return o, (q, k, v, bias, mask, drop_seed, o, m, l)


def _attention_bwd(scale, softcap, rate, res, do):
  q, k, v, bias, mask, drop_seed, o, m, l = res
  b, t, kh, g, d = q.shape
  q = _after(q, do)
  s, tanh = scores(q, k, bias, mask, scale, softcap)
  # Tied to the cotangent like the scores, so XLA recomputes the mask here rather than keeping
  # the forward's.
  keep = _keep(None if drop_seed is None else _after(drop_seed, do), s.shape, rate)
  p = jnp.exp(s - m) / l
  # Head-major (B, K, G·T, ·) operands: every dot below reads the (B, K, G, T, S) tensors in the
  # layout they were written in (no transposed copy of them), and dk, dv sum over the G query
  # heads of their group inside the dot.
  rows = (b, kh, g * t, s.shape[-1])
  q_h, k_h, v_h, do_h = _heads_major(q), _kv_major(k), _kv_major(v), _heads_major(do)
  dv_BxKxDxS = _dot(do_h, _dropped(p, keep, rate).reshape(rows).astype(v.dtype), 2, 2)
  dp = _dropped(_dot(do_h, v_h, 3, 3).reshape(s.shape), keep, rate)
  # Σ_s dP·P = Σ_d dO·O per query (dropout included): a (B, T, H, D) reduction instead of a
  # (B, H, T, S) one.
  delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1)   # (B, T, K, G)
  ds = p * (dp - jnp.transpose(delta, (0, 2, 3, 1))[..., None])
  if mask is not None:   # masked scores are constants: no gradient flows through them
    ds = jnp.where(mask, ds, 0.0)
  dbias = None if bias is None else _unbroadcast(ds, bias.shape).astype(bias.dtype)
  if softcap:
    ds = ds * (1.0 - tanh * tanh)
  ds = (ds * jnp.float32(scale)).astype(q.dtype).reshape(rows)
  dq = jnp.transpose(_dot(ds, k_h, 3, 2).reshape(b, kh, g, t, d), (0, 3, 1, 2, 4))
  dk = jnp.transpose(_dot(q_h, ds, 2, 2), (0, 3, 1, 2))                # (B,K,D,S) -> (B,S,K,D)
  dv = jnp.transpose(dv_BxKxDxS, (0, 3, 1, 2))
  return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dbias, None, None)


attention.defvjp(_attention_fwd, _attention_bwd)
