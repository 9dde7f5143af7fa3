"""Memory-lean attention and GELU for the transformers Flax BERT family, swapped in at call time.

For the backward pass, the transformers Flax BERT layer keeps four (B, H, T, T) float32 tensors
of attention (scores, softmax, dropout multiplier, dropped probabilities) and five (B, T, 4d)
intermediates of its exact GELU (erfc and its derivative pieces): on MiniLM at batch 32 x 128
tokens that is ~200 MB per layer, most of a training step's memory. Here

  attention:  a custom VJP that keeps q, k, v, the output and the log-sum-exp, and recomputes
              the probabilities in the backward pass (FlashAttention's recomputation, untiled:
              encoder sequences fit), with D = rowsum(dO ∘ O) for the softmax backward;
  GELU:       x·Φ(x) with Φ from erf (PyTorch's form), a custom VJP that keeps only x.

Same maths and the same dropout stream (`module.make_rng("dropout")`, flax's mask broadcast over
batch and heads), so outputs and gradients equal the model's own to float rounding (tested in
tests/test_fused.py). The swap is `flax.linen.intercept_methods` on the model's own modules, as
for factored adapters: the model code is untouched and `query`/`key`/`value` still go through
their Dense layers (and so through any adapter interceptor).

Example:
  >>> with fused.fused_layers():
  ...   logits = model(**batch, params=params, dropout_rng=key, train=True).logits
"""

from __future__ import annotations

import contextlib
import inspect
import math

import jax
import jax.numpy as jnp
from flax import linen as nn

_SQRT_HALF = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


# ------------------------------------------------------------------------------------- GELU

@jax.custom_vjp
def gelu(x):
  """Exact GELU x·Φ(x), Φ(x) = (1 + erf(x/√2))/2; the backward keeps x only."""
  return x * (0.5 * (1.0 + jax.lax.erf(x * _SQRT_HALF)))


def _gelu_fwd(x):
  return gelu(x), x


def _after(x, cotangent):
  """x, made to depend on the cotangent so the recomputation stays in the backward pass.

  XLA would otherwise merge it with the forward's identical ops (CSE) or hoist it there, and keep
  the large intermediates alive after all; XLA:CPU drops optimization barriers before CSE. A
  float multiply by zero is not folded (NaN semantics), so the tie survives optimisation; a
  non-finite cotangent makes the whole gradient non-finite, which the trainer rejects anyway.
  """
  return x + (cotangent.reshape(-1)[0] * 0).astype(x.dtype)


def _gelu_bwd(x, dy):
  xf = _after(x, dy).astype(jnp.float32)
  cdf = 0.5 * (1.0 + jax.lax.erf(xf * _SQRT_HALF))
  pdf = _INV_SQRT_2PI * jnp.exp(-0.5 * xf * xf)
  return ((dy.astype(jnp.float32) * (cdf + xf * pdf)).astype(x.dtype),)


gelu.defvjp(_gelu_fwd, _gelu_bwd)


# -------------------------------------------------------------------------------- attention

def _probs(q_BTHD, k_BSHD, bias):
  """Scaled scores plus bias in float32, as flax's dot_product_attention_weights orders them."""
  q = q_BTHD / jnp.sqrt(q_BTHD.shape[-1]).astype(q_BTHD.dtype)
  s_BHTS = jnp.einsum("bqhd,bkhd->bhqk", q, k_BSHD, preferred_element_type=jnp.float32)
  if bias is not None:
    s_BHTS = s_BHTS + bias.astype(jnp.float32)
  return q, s_BHTS


@jax.custom_vjp
def attention(q_BTHD, k_BSHD, v_BSHD, bias, keep):
  """softmax(q·kᵀ/√d + bias) · keep · v for (batch, time, heads, depth) inputs.

  `bias` broadcasts to (B, H, T, S) (e.g. (B, 1, 1, S) from a padding mask) or is None; `keep`
  is the dropout multiplier (0 or 1/keep_prob, broadcast to (B, H, T, S)) or None. The backward
  recomputes the probabilities instead of storing them.
  """
  return _attention_fwd(q_BTHD, k_BSHD, v_BSHD, bias, keep)[0]


def _attention_fwd(q_BTHD, k_BSHD, v_BSHD, bias, keep):
  _, s_BHTS = _probs(q_BTHD, k_BSHD, bias)
  m_BHT1 = jnp.max(s_BHTS, axis=-1, keepdims=True)
  e_BHTS = jnp.exp(s_BHTS - m_BHT1)
  l_BHT1 = jnp.sum(e_BHTS, axis=-1, keepdims=True)
  p_BHTS = e_BHTS / l_BHT1
  if keep is not None:
    p_BHTS = p_BHTS * keep.astype(jnp.float32)
  o_BTHD = jnp.einsum("bhqk,bkhd->bqhd", p_BHTS.astype(v_BSHD.dtype), v_BSHD)
  lse_BHT1 = m_BHT1 + jnp.log(l_BHT1)
  return o_BTHD, (q_BTHD, k_BSHD, v_BSHD, bias, keep, o_BTHD, lse_BHT1)


def _attention_bwd(res, do_BTHD):
  q_BTHD, k_BSHD, v_BSHD, bias, keep, o_BTHD, lse_BHT1 = res
  dtype = v_BSHD.dtype
  q_scaled, s_BHTS = _probs(_after(q_BTHD, do_BTHD), k_BSHD, bias)
  p_BHTS = jnp.exp(s_BHTS - lse_BHT1)
  pd_BHTS = p_BHTS if keep is None else p_BHTS * keep.astype(jnp.float32)
  dv_BSHD = jnp.einsum("bhqk,bqhd->bkhd", pd_BHTS.astype(dtype), do_BTHD)
  dpd_BHTS = jnp.einsum("bqhd,bkhd->bhqk", do_BTHD, v_BSHD, preferred_element_type=jnp.float32)
  dp_BHTS = dpd_BHTS if keep is None else dpd_BHTS * keep.astype(jnp.float32)
  # Σ_k dP·P = Σ_d dO·O per query: a (B, T, H) reduction instead of a (B, H, T, S) one.
  delta_BTH = jnp.sum(do_BTHD.astype(jnp.float32) * o_BTHD.astype(jnp.float32), axis=-1)
  ds_BHTS = (p_BHTS * (dp_BHTS - jnp.transpose(delta_BTH, (0, 2, 1))[..., None])).astype(dtype)
  dq_BTHD = jnp.einsum("bhqk,bkhd->bqhd", ds_BHTS, k_BSHD) / jnp.sqrt(
      q_BTHD.shape[-1]).astype(dtype)
  dk_BSHD = jnp.einsum("bhqk,bqhd->bkhd", ds_BHTS, q_scaled)
  zeros = lambda x: None if x is None else jnp.zeros_like(x)  # noqa: E731
  return (dq_BTHD.astype(q_BTHD.dtype), dk_BSHD.astype(k_BSHD.dtype), dv_BSHD, zeros(bias),
          zeros(keep))


attention.defvjp(_attention_fwd, _attention_bwd)


# ------------------------------------------------------------------ module replacements

def _self_attention(module, hidden_states, attention_mask=None, layer_head_mask=None,
                    key_value_states=None, init_cache=False, deterministic=True,
                    output_attentions=False):
  """FlaxBertSelfAttention / FlaxViTSelfAttention.__call__ on `attention`; None if unsupported."""
  if (getattr(module, "causal", False) or key_value_states is not None or init_cache
      or output_attentions or (attention_mask is not None and attention_mask.ndim != 2)):
    return None
  cfg = module.config
  heads = cfg.num_attention_heads
  split = lambda x: x.reshape(x.shape[:2] + (heads, x.shape[-1] // heads))  # noqa: E731
  q = split(module.query(hidden_states))
  k = split(module.key(hidden_states))
  v = split(module.value(hidden_states))
  dtype = q.dtype
  bias = None
  if attention_mask is not None:
    bias = jnp.where(attention_mask[:, None, None, :] > 0, 0.0,
                     jnp.finfo(dtype).min).astype(dtype)
  keep = None
  rate = cfg.attention_probs_dropout_prob
  if not deterministic and rate > 0.0:
    # Flax's broadcast_dropout: one (T, S) mask shared by the batch and the heads, same stream.
    keep_prob = 1.0 - rate
    mask = jax.random.bernoulli(module.make_rng("dropout"), keep_prob,
                                (1, 1, q.shape[1], k.shape[1]))
    keep = mask.astype(dtype) / jnp.asarray(keep_prob, dtype=dtype)
  out = attention(q, k, v, bias, keep)
  if layer_head_mask is not None:  # per-head weights on the probabilities = on the output
    out = out * jnp.asarray(layer_head_mask, out.dtype)[:, None]
  return (out.reshape(out.shape[:2] + (-1,)),)


def _intermediate(module, hidden_states):
  if module.config.hidden_act != "gelu":
    return None
  return gelu(module.dense(hidden_states))


def fused_layers(attention_classes=(), intermediate_classes=()):
  """Context in which the named self-attention and intermediate blocks run memory-lean.

  The class names come from the model family's record (`Family.fused_classes`): transformers
  Flax BERT-style self-attention (ViT's without a mask) and Dense + ACT2FN[hidden_act] blocks.
  Unsupported calls (causal, cross-attention, cached decoding, returned attention weights,
  activations other than exact GELU) run unchanged.

  Example:
    >>> with fused_layers(*family.fused_classes):
    ...   out = model(**inputs, params=params, dropout_rng=key, train=True)
  """
  replacements = {**{n: _self_attention for n in attention_classes},
                  **{n: _intermediate for n in intermediate_classes}}
  if not replacements:
    return contextlib.nullcontext()

  def interceptor(next_fun, args, kwargs, context):
    replacement = replacements.get(type(context.module).__name__)
    if replacement is None or context.method_name != "__call__":
      return next_fun(*args, **kwargs)
    arguments = inspect.signature(type(context.module).__call__).bind(
        context.module, *args, **kwargs).arguments
    module = arguments.pop("self")
    out = replacement(module, **arguments)
    return next_fun(*args, **kwargs) if out is None else out

  return nn.intercept_methods(interceptor)
