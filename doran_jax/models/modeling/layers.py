"""Pieces shared by our Flax model families: attention, norms, projections, activations.

Conventions every family keeps (the adapters and the checkpoint loader rely on them):
  * every projection an adapter may target is a `flax.linen.Dense` (our subclass `Dense`, which
    also takes a quantised kernel, doran_jax.quant) with kernel (in, out) created with an
    explicit name, so `module.scope.path` is its param path without the leaf
    (doran_jax.adapters.factored intercepts `nn.Dense.__call__` by that path);
  * norms keep their weight as `scale` (and `bias`), embeddings as `embedding`, so
    doran_jax.models.hf_io maps them to torch's `weight`;
  * attention takes (B, T, H, D) tensors; scores and softmax run in float32;
  * `memory_lean` (the families' build switch, config `model.fused_layers`) picks the backend's
    attention path (`default_implementation`: memory-lean custom VJP for encoders on CPU, cuDNN
    flash on GPU) and the custom-VJP exact GELU (fused_ops); off, both are plain XLA autodiff.

Example:
  >>> q = dense(64, name="query", dtype=jnp.bfloat16)(x)           # (B, T, 64)
  >>> out_BxTxHxD = dot_product_attention(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD,
  ...                                     mask=attention_mask, causal=True)
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from flax import linen as nn

from doran_jax import dropout as dropout_lib
from doran_jax import quant
from doran_jax.errors import ConfigError
from doran_jax.models.modeling import fused_ops

Array = Any
Dtype = Any

_SQRT_HALF = 1.0 / math.sqrt(2.0)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
IMPLEMENTATIONS = ("xla", "lean", "jax", "cudnn")


# ----------------------------------------------------------------------------------- attention

def _heads_to_groups(x, num_kv: int):
  """(b, h, t, s) with h in {1, H} -> (b, 1|K, 1|G, t, s) for the grouped score layout."""
  if x.ndim != 4:
    raise ValueError(f"attention mask/bias must be (B, S) or broadcastable to (B, H, T, S); got "
                     f"shape {x.shape}.")
  b, h, t, s = x.shape
  if h == 1:
    return x[:, :, None]
  return x.reshape(b, num_kv, h // num_kv, t, s)


def default_implementation(*, causal: bool = False, window: Optional[int] = None,
                           dropout: bool = False, logit_softcap: Optional[float] = None,
                           dtype: Optional[Dtype] = None, head_dim: int = 64,
                           backend: Optional[str] = None) -> str:
  """The attention path `dot_product_attention(implementation=None)` takes on this backend.

  GPU: 'cudnn' (flash attention) for bf16/fp16 without dropout or softcap and a head dim cuDNN
  takes, else 'xla'. TPU: 'jax' (jax.nn.dot_product_attention) without dropout or softcap.
  CPU: 'lean' for encoder attention (neither causal nor windowed), where the probabilities are
  the bulk of a training step's memory; 'xla' otherwise.

  Example:
    >>> default_implementation(causal=True, backend="cpu")
    'xla'
  """
  backend = backend or jax.default_backend()
  plain = not dropout and not logit_softcap
  if backend in ("gpu", "cuda", "rocm"):
    half = dtype is not None and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16),
                                                      jnp.dtype(jnp.float16))
    return "cudnn" if plain and half and head_dim % 8 == 0 and head_dim <= 128 else "xla"
  if backend == "tpu":
    return "jax" if plain else "xla"
  return "lean" if not causal and window is None else "xla"


def _jax_attention(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, bias, keep_mask, causal, window, scale,
                   implementation):
  """jax.nn.dot_product_attention with our mask conventions ('jax' -> its XLA path)."""
  t, s = q_BxTxHxD.shape[1], k_BxSxKxD.shape[1]
  is_causal, local = False, None
  if t == s:   # jax aligns causality and windows top-left; ours bottom-right: equal when T == S
    is_causal = causal
    local = None if window is None else (window - 1, 0)
  elif causal or window is not None:
    allowed = _allowed(t, s, causal, window)[None, None]
    keep_mask = allowed if keep_mask is None else keep_mask & allowed
  if keep_mask is not None and implementation == "cudnn":
    # cuDNN turns the mask into a bias, which must span (T, S).
    keep_mask = jnp.broadcast_to(keep_mask, keep_mask.shape[:2] + (t, s))
  return jax.nn.dot_product_attention(
      q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, bias=bias, mask=keep_mask, scale=scale,
      is_causal=is_causal, local_window_size=local,
      implementation="cudnn" if implementation == "cudnn" else None)


def _allowed(t: int, s: int, causal: bool, window: Optional[int]):
  """(T, S) bool: query t sees key s (causal: s <= t + S - T; window: s > t + S - T - window)."""
  q_pos = jnp.arange(t)[:, None] + (s - t)
  k_pos = jnp.arange(s)[None, :]
  allowed_TxS = jnp.ones((t, s), bool)
  if causal:
    allowed_TxS = allowed_TxS & (k_pos <= q_pos)
  if window is not None:
    allowed_TxS = allowed_TxS & (k_pos > q_pos - window)
  return allowed_TxS


def dot_product_attention(q_BxTxHxD: Array, k_BxSxKxD: Array, v_BxSxKxD: Array, *,
                          mask: Optional[Array] = None, causal: bool = False,
                          bias: Optional[Array] = None, dropout_rate: float = 0.0,
                          dropout_rng: Optional[jax.Array] = None, scale: Optional[float] = None,
                          logit_softcap: Optional[float] = None,
                          window: Optional[int] = None, dtype: Optional[Dtype] = None,
                          implementation: Optional[str] = None) -> Array:
  """Softmax attention with grouped-query heads, padding/causal/window masks and dropout.

  K and V may have fewer heads K than the H query heads (H % K == 0); query heads are grouped as
  (K, G = H / K) and the repeated K/V are never materialised. Scores, masking and softmax are in
  float32; the probabilities are cast to v's dtype for the value product.

  Args:
    q_BxTxHxD: queries.
    k_BxSxKxD, v_BxSxKxD: keys and values.
    mask: True / 1 = attend. (B, S) key padding (transformers' `attention_mask`), or boolean
      broadcastable to (B, H, T, S) with its head axis 1 or H.
    causal: query t sees keys s <= t + (S - T) (the last T queries of S positions, so a
      KV cache lines up).
    bias: added to the scaled scores, broadcastable to (B, H, T, S) (head axis 1 or H).
    dropout_rate, dropout_rng: dropout on the probabilities (PyTorch's: per element, scaled by
      1 / (1 - rate)); applied only when both rate > 0 and an rng are given. The 'xla' and
      'lean' paths draw the same mask from the same rng (`doran_jax.dropout.keep_mask` of
      shape (B, K, G, T, S)).
    scale: score scale; 1 / sqrt(D) when None.
    logit_softcap: scores -> cap * tanh(scores / cap) before masking (Gemma 2).
    window: sliding window: a query also only sees keys s > t + (S - T) - window.
    dtype: output dtype; v's when None.
    implementation: None = `default_implementation` for this backend; 'xla' (plain autodiff),
      'lean' (custom VJP recomputing the probabilities in the backward pass: same maths, far
      less memory), 'jax' (jax.nn.dot_product_attention, its XLA path) or 'cudnn' (its cuDNN
      flash attention; GPU, bf16/fp16). 'jax' and 'cudnn' take no dropout or softcap.

  Returns:
    (B, T, H, D) attention outputs.

  Example:
    >>> out = dot_product_attention(q, k, v, mask=batch["attention_mask"], causal=True)
  """
  b, t, h, d = q_BxTxHxD.shape
  s, kv = k_BxSxKxD.shape[1], k_BxSxKxD.shape[2]
  if h % kv:
    raise ConfigError(f"{h} query heads do not split into groups over {kv} key/value heads.")
  g = h // kv
  scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
  dropout = dropout_rate > 0.0 and dropout_rng is not None
  out_dtype = v_BxSxKxD.dtype if dtype is None else dtype
  auto = implementation is None
  if auto:
    implementation = default_implementation(causal=causal, window=window, dropout=dropout,
                                            logit_softcap=logit_softcap,
                                            dtype=q_BxTxHxD.dtype, head_dim=d)
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"unknown attention implementation {implementation!r}; choose one of "
                     f"{', '.join(IMPLEMENTATIONS)} (or None for the backend's default).")

  mask_4d = None
  if mask is not None:
    mask = jnp.asarray(mask).astype(bool)
    mask_4d = mask[:, None, None, :] if mask.ndim == 2 else mask
    if mask_4d.ndim != 4:
      raise ValueError(f"attention mask must be (B, S) or broadcastable to (B, H, T, S); got "
                       f"shape {mask.shape}.")

  if implementation in ("jax", "cudnn"):
    if dropout or logit_softcap:
      raise ValueError(f"attention implementation {implementation!r} has no dropout or logit "
                       "softcap; use 'xla' or 'lean'.")
    try:
      out = _jax_attention(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD,
                           None if bias is None else jnp.asarray(bias), mask_4d, causal, window,
                           scale, implementation)
      return out.astype(out_dtype)
    except (NotImplementedError, ValueError, RuntimeError):
      if not auto:
        raise
      implementation = "xla"   # a shape or setup cuDNN refuses: the plain path instead

  q_BxTxKxGxD = q_BxTxHxD.reshape(b, t, kv, g, d)
  bias_5d = None if bias is None else _heads_to_groups(jnp.asarray(bias, jnp.float32), kv)
  keep = None if mask_4d is None else _heads_to_groups(mask_4d, kv)
  if causal or window is not None:
    allowed_TxS = _allowed(t, s, causal, window)
    keep = allowed_TxS if keep is None else keep & allowed_TxS
  # The dropout mask is a keyed hash of each element's index (doran_jax.dropout): both paths
  # draw the same mask, and the lean path recomputes it in the backward pass from the seed.
  drop_seed = dropout_lib.seed(dropout_rng) if dropout else None
  attend = functools.partial(_attend, implementation=implementation, scale=scale,
                             softcap=logit_softcap, rate=float(dropout_rate))
  blocks = None if dropout else causal_blocks(t, s, causal, window)
  if blocks is None:
    out = attend(q_BxTxKxGxD, k_BxSxKxD, v_BxSxKxD, bias_5d, keep, drop_seed)
  else:
    out = jnp.concatenate([
        attend(q_BxTxKxGxD[:, t0:t1], k_BxSxKxD[:, s0:s1], v_BxSxKxD[:, s0:s1],
               _block(bias_5d, t0, t1, s0, s1), _block(keep, t0, t1, s0, s1), None)
        for t0, t1, s0, s1 in blocks], axis=1)
  return out.reshape(b, t, h, d).astype(out_dtype)


# causal_blocks: split from 128 queries, into at most 8 blocks of at least 64.
_MIN_SPLIT = 128
_MAX_BLOCKS = 8


def causal_blocks(t: int, s: int, causal: bool, window: Optional[int]):
  """[(t0, t1, s0, s1)]: query blocks of a causal self-attention and the keys each can see.

  Queries t0..t1-1 see no key at or after t1 (causality) nor before t0 + 1 - window, so each
  block's scores are computed against keys s0..s1-1 only: about half the score-sized work (and
  memory traffic) of the full (T, S) square at 4-8 blocks, and smaller blocks stay in cache. On a
  2-core CPU one LLaMA-shaped layer's attention at T = 256 (forward and backward) took 12-15 ms
  in 4 blocks against 31 ms whole (docs/benchmarks.md). None (no split) without causality, with a
  KV cache (T != S) or below 128 queries. A query with no visible key at all (padding) averages
  the values of its block's keys rather than of all keys; nothing reads such rows.

  Example:
    >>> causal_blocks(256, 256, True, None)
    [(0, 64, 0, 64), (64, 128, 0, 128), (128, 192, 0, 192), (192, 256, 0, 256)]
  """
  if not causal or t != s or t < _MIN_SPLIT:
    return None
  size = max(_MIN_SPLIT // 2, -(-t // _MAX_BLOCKS))
  blocks = []
  for t0 in range(0, t, size):
    t1 = min(t0 + size, t)   # the last query of the block sees keys up to t1 - 1
    blocks.append((t0, t1, 0 if window is None else max(0, t0 + 1 - window), t1))
  return blocks


def _block(x, t0, t1, s0, s1):
  """The (t0:t1, s0:s1) block of a mask or bias whose last two axes are (T or 1, S or 1)."""
  if x is None:
    return None
  rows = slice(t0, t1) if x.shape[-2] > 1 else slice(None)
  cols = slice(s0, s1) if x.shape[-1] > 1 else slice(None)
  return x[..., rows, cols]


def _attend(q_BxTxKxGxD, k_BxSxKxD, v_BxSxKxD, bias_5d, keep, drop_seed, *, implementation,
            scale, softcap, rate):
  """(B, T, K, G, D) attention outputs by the 'lean' or 'xla' path (masks already combined)."""
  if implementation == "lean":
    return fused_ops.attention(q_BxTxKxGxD, k_BxSxKxD, v_BxSxKxD, bias_5d, keep, drop_seed,
                               scale, softcap, rate)
  scores, _ = fused_ops.scores(q_BxTxKxGxD, k_BxSxKxD, bias_5d, keep, scale, softcap)
  probs = jax.nn.softmax(scores, axis=-1)
  if drop_seed is not None:
    kept = dropout_lib.keep_mask_from_seed(drop_seed, 1.0 - rate, probs.shape)
    probs = jnp.where(kept, probs / (1.0 - rate), 0.0)
  return fused_ops.weighted_values(probs, v_BxSxKxD)


def segment_mask(segment_ids_BxT: Array, key_mask_BxT: Optional[Array] = None) -> Array:
  """(B, 1, T, T) bool for packed rows: query and key share a non-zero segment id.

  Segment id 0 marks padding (never attended to). `key_mask_BxT` (an attention_mask) further
  masks keys. Causality and windows stay `dot_product_attention`'s (`causal`, `window`): within
  a segment, slot distance is position distance.

  Example:
    >>> segment_mask(jnp.array([[1, 1, 2, 0]]))[0, 0].astype(int)
    Array([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]], dtype=int32)
  """
  seg_BxT = jnp.asarray(segment_ids_BxT)
  keep_BxTxT = (seg_BxT[:, :, None] == seg_BxT[:, None, :]) & (seg_BxT[:, None, :] != 0)
  if key_mask_BxT is not None:
    keep_BxTxT = keep_BxTxT & jnp.asarray(key_mask_BxT).astype(bool)[:, None, :]
  return keep_BxTxT[:, None]


def segment_positions(segment_ids_BxT: Array) -> Array:
  """(B, T) int32 positions restarting at 0 where the segment id changes (packed rows).

  Example:
    >>> segment_positions(jnp.array([[1, 1, 1, 2, 2, 0]]))
    Array([[0, 1, 2, 0, 1, 0]], dtype=int32)
  """
  seg_BxT = jnp.asarray(segment_ids_BxT)
  t = seg_BxT.shape[1]
  slots_T = jnp.arange(t, dtype=jnp.int32)
  starts_BxT = jnp.concatenate([jnp.ones_like(seg_BxT[:, :1], bool),
                                seg_BxT[:, 1:] != seg_BxT[:, :-1]], axis=1)
  first_BxT = jax.lax.cummax(jnp.where(starts_BxT, slots_T, 0), axis=1)
  return slots_T - first_BxT


def cache_keys(batch: dict) -> Array:
  """(B, S) bool: the cache slots holding real tokens (`attention_mask` over the slots of
  `batch['cache']`; all True when absent).

  Example:
    >>> cache_keys({"input_ids": ids_Bx1, "cache": cache, "attention_mask": mask_BxS})
  """
  if batch.get("attention_mask") is not None:
    return jnp.asarray(batch["attention_mask"]).astype(bool)
  return jnp.ones(batch["cache"][0]["k"].shape[:2], bool)


def cache_mask(key_mask_BxS: Array, index: Array, t: int, window: Optional[int] = None) -> Array:
  """(B, 1, T, S) bool for T queries written at cache slots index .. index + T - 1.

  Query slot q sees key slot s when the key is real (`key_mask_BxS`), s <= q (causal) and, with
  a sliding window, s > q - window. Slots must be contiguous per row (left-padded prompts, then
  one slot per new token), so slot distance is position distance.

  Example:
    >>> m = cache_mask(key_mask_BxS, jnp.int32(7), 1, window=4)   # one decode step at slot 7
  """
  s = key_mask_BxS.shape[1]
  q_T = jnp.asarray(index, jnp.int32) + jnp.arange(t, dtype=jnp.int32)
  k_S = jnp.arange(s, dtype=jnp.int32)
  allowed_TxS = k_S[None, :] <= q_T[:, None]
  if window is not None:
    allowed_TxS = allowed_TxS & (k_S[None, :] > q_T[:, None] - window)
  return jnp.asarray(key_mask_BxS).astype(bool)[:, None, None, :] & allowed_TxS[None, None]


def write_cache(cache, k_BxTxKxD, v_BxTxKxD, index):
  """{'k', 'v'} (B, S, K, D) with this call's T keys and values written at slots index ..

  Example:
    >>> cache = write_cache(cache, k_BxTxKxD, v_BxTxKxD, jnp.int32(5))
  """
  at = (0, jnp.asarray(index, jnp.int32), 0, 0)
  return {"k": jax.lax.dynamic_update_slice(cache["k"], k_BxTxKxD.astype(cache["k"].dtype), at),
          "v": jax.lax.dynamic_update_slice(cache["v"], v_BxTxKxD.astype(cache["v"].dtype), at)}


def attention_keys(batch: dict, key: str = "input_ids") -> Array:
  """The attention mask of a text batch without a cache: (B, T) key padding, or (B, 1, T, T)
  when the batch packs several sequences per row (`segment_ids`).

  Example:
    >>> mask = attention_keys({"input_ids": ids, "segment_ids": seg})     # (B, 1, T, T)
  """
  if batch.get("segment_ids") is None:
    return padding_mask(batch, key)
  key_mask = batch.get("attention_mask")
  return segment_mask(batch["segment_ids"], key_mask)


def at_logit_positions(h_BxTxD: Array, batch: dict) -> Array:
  """The hidden states the LM head reads: (B, K, D) at `batch['logit_positions']` (B, K) when the
  batch names positions (training and eval batches of causal-LM data, see
  data.causal.target_positions), else all (B, T, D).

  Example:
    >>> logits_BxKxV = lm_head(at_logit_positions(h_BxTxD, batch))
  """
  positions_BxK = batch.get("logit_positions")
  if positions_BxK is None:
    return h_BxTxD
  return jnp.take_along_axis(h_BxTxD, jnp.asarray(positions_BxK)[..., None], axis=1)


def padding_mask(batch: dict, key: str = "input_ids") -> Array:
  """`batch['attention_mask']` as bool (B, T), all True when absent (T from `batch[key]`)."""
  if batch.get("attention_mask") is not None:
    return jnp.asarray(batch["attention_mask"]).astype(bool)
  ids = batch[key]
  return jnp.ones(ids.shape[:2], bool)


# ----------------------------------------------------------------------------------- layers

def normal_init(std: float = 0.02):
  """transformers' default weight init (normal with `initializer_range`), for fresh heads."""
  return nn.initializers.normal(stddev=std)


class Dense(nn.Dense):
  """`flax.linen.Dense` whose stored kernel may be a `doran_jax.quant.QuantizedKernel`.

  A quantised kernel (a frozen base loaded with model.quantize) is dequantised on the fly in the
  compute dtype inside `quant.matmul`; a float kernel takes flax's own path unchanged.

  Example:
    >>> y = Dense(3, name="query", dtype=jnp.bfloat16).apply({"params": {"kernel": q}}, x)
  """

  @nn.compact
  def __call__(self, inputs):
    kernel = self.get_variable("params", "kernel") if self.has_variable("params", "kernel") else None
    if not quant.is_quantized(kernel):
      return super().__call__(inputs)
    # Read, not declared with self.param: flax would compare the codes' shape with (in, out).
    if kernel.shape[0] != jnp.shape(inputs)[-1] or kernel.shape[1] != self.features:
      raise ValueError(f"quantised kernel {'/'.join(self.scope.path)} has shape {kernel.shape}; "
                       f"this layer takes {jnp.shape(inputs)[-1]} -> {self.features} features.")
    dtype = self.dtype or jnp.promote_types(inputs.dtype, jnp.dtype(kernel.dtype))
    y = quant.matmul(jnp.asarray(inputs, dtype), kernel)
    if self.use_bias:
      bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
      y = y + jnp.asarray(bias, dtype)
    return y


def dense(features: int, *, name: str, use_bias: bool = True, dtype: Optional[Dtype] = None,
          param_dtype: Dtype = jnp.float32, std: float = 0.02) -> nn.Dense:
  """A Dense (flax's, taking quantised kernels too) in our convention: explicit name, kernel
  (in, out), bias zeros.

  Example:
    >>> y = dense(3, name="classifier", dtype=jnp.float32)(x)
  """
  return Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                  kernel_init=normal_init(std), bias_init=nn.initializers.zeros, name=name)


def embed(num: int, features: int, *, name: str, dtype: Optional[Dtype] = None,
          param_dtype: Dtype = jnp.float32, std: float = 0.02) -> nn.Embed:
  """A `flax.linen.Embed` (param `embedding`, (num, features)).

  Example:
    >>> x = embed(128, 32, name="word_embeddings")(input_ids)
  """
  return nn.Embed(num, features, dtype=dtype, param_dtype=param_dtype,
                  embedding_init=normal_init(std), name=name)


def layer_norm(epsilon: float, *, name: str, dtype: Optional[Dtype] = None,
               param_dtype: Dtype = jnp.float32, use_bias: bool = True) -> nn.LayerNorm:
  """PyTorch's LayerNorm as `flax.linen.LayerNorm` (params `scale`, `bias`).

  Statistics in float32 with the two-pass variance E[(x - mean)^2] that torch uses (flax's default
  one-pass E[x^2] - mean^2 differs by rounding).

  Example:
    >>> y = layer_norm(1e-12, name="LayerNorm")(x)
  """
  return nn.LayerNorm(epsilon=epsilon, dtype=dtype, param_dtype=param_dtype, use_bias=use_bias,
                      use_fast_variance=False, name=name)


class RMSNorm(nn.Module):
  """x / rms(x) · (offset + scale), statistics in float32; param `scale` (d,).

  Attributes:
    epsilon: added to the mean square.
    scale_offset: 0 for Llama/Mistral/Qwen (scale init ones); 1 for Gemma, whose stored weight
      w multiplies as (1 + w) (init zeros).
    scale_in_float32: Gemma multiplies by the scale in float32 and casts after; Llama casts the
      normalised x to the input dtype first, then multiplies.
    dtype: output dtype; the input's when None.

  Example:
    >>> y = RMSNorm(1e-6, name="input_layernorm")(x)
  """

  epsilon: float = 1e-6
  scale_offset: float = 0.0
  scale_in_float32: bool = False
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    init = nn.initializers.zeros if self.scale_offset else nn.initializers.ones
    scale = self.param("scale", init, (x.shape[-1],), self.param_dtype)
    dtype = self.dtype or x.dtype
    xf = x.astype(jnp.float32)
    normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.epsilon)
    if self.scale_in_float32:
      return (normed * (self.scale_offset + scale.astype(jnp.float32))).astype(dtype)
    return (normed.astype(x.dtype) * (self.scale_offset + scale).astype(x.dtype)).astype(dtype)


# ----------------------------------------------------------------------------------- activations

def gelu(x):
  """Exact GELU x·Φ(x) with Φ from erf (PyTorch's `gelu`, transformers' 'gelu')."""
  return x * (0.5 * (1.0 + jax.lax.erf(x * jnp.asarray(_SQRT_HALF, x.dtype))))


def gelu_tanh(x):
  """The tanh approximation (transformers' 'gelu_new', 'gelu_pytorch_tanh', 'gelu_fast')."""
  c = jnp.asarray(_SQRT_2_OVER_PI, x.dtype)
  return 0.5 * x * (1.0 + jnp.tanh(c * (x + jnp.asarray(0.044715, x.dtype) * x * x * x)))


def quick_gelu(x):
  """x·sigmoid(1.702 x) (transformers' 'quick_gelu')."""
  return x * jax.nn.sigmoid(jnp.asarray(1.702, x.dtype) * x)


ACTIVATIONS: dict[str, Callable] = {
    "gelu": gelu,
    "gelu_new": gelu_tanh,
    "gelu_pytorch_tanh": gelu_tanh,
    "gelu_fast": gelu_tanh,
    "quick_gelu": quick_gelu,
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
}


def activation(name: str, memory_lean: bool = False) -> Callable:
  """transformers' `hidden_act` name -> the function; with `memory_lean`, exact GELU is the
  custom VJP that keeps only its input for the backward pass (same values).

  Example:
    >>> activation("gelu_new")(x)
  """
  if name not in ACTIVATIONS:
    raise ConfigError(
        f"unsupported activation {name!r}; supported: {', '.join(sorted(ACTIVATIONS))}.")
  if memory_lean and name == "gelu":
    return fused_ops.gelu
  return ACTIVATIONS[name]


def attention_implementation(memory_lean: bool) -> Optional[str]:
  """`dot_product_attention`'s `implementation` for a family's `memory_lean` switch."""
  return None if memory_lean else "xla"


def dropout(rate: float, x, module: nn.Module, train: bool):
  """Dropout on `x` from the module's 'dropout' rng stream in train mode; identity otherwise."""
  if not train or rate == 0.0:
    return x
  return dropout_lib.apply(x, module.make_rng("dropout"), rate)
