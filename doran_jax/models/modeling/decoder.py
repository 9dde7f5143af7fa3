"""One Flax linen decoder for the LLaMA family: Llama 1-3.x, Mistral, Qwen 2/3 and Gemma 3 text.

The families differ only in switches read from their transformers config dict (`DecoderConfig`):

  llama        pre-norm RMSNorm, SwiGLU MLP, RoPE (+ any rope scaling), GQA; optional biases
               (`attention_bias`, `mlp_bias`).
  mistral      llama + sliding-window attention on every layer when `sliding_window` is set.
  qwen2        llama + q/k/v biases (not o); sliding layers per `layer_types` (or
               `use_sliding_window` / `max_window_layers` in older configs).
  qwen3        llama + per-head RMSNorm on q and k before RoPE (`q_norm`, `k_norm`), `head_dim`.
  gemma3_text  RMSNorm as x·(1 + w) in float32; four norms per layer (input, post_attention,
               pre_feedforward, post_feedforward); embeddings × sqrt(hidden) in the compute
               dtype; q/k norm; scores scaled by `query_pre_attn_scalar`^-0.5; GELU-tanh MLP;
               sliding (local, `rope_local_base_freq`, unscaled) and full (global, `rope_theta`
               + rope scaling) layers per `layer_types` / `sliding_window_pattern`; optional
               final logit softcapping (`attn_logit_softcapping` is ignored, as transformers'
               Gemma 3 ignores it).

Parameter paths are transformers' state-dict names with '.' -> '/' (hf_io's rule), e.g.
`model/embed_tokens/embedding`, `model/layers/3/self_attn/q_proj/kernel` (in, out),
`model/layers/3/input_layernorm/scale`, `model/norm/scale`, `lm_head/kernel` (absent when
`tie_word_embeddings`: the logits then use `model/embed_tokens/embedding`), `score/kernel`.
The `features` task returns the bare decoder (like torch's `LlamaModel`), so its paths have no
`model/` prefix: `embed_tokens/embedding`, `layers/0/...`, `norm/scale`.

Every projection is a `flax.linen.Dense` with an explicit name, so `module.scope.path` equals its
param path and doran_jax's factored adapters can intercept it. Computation is in `dtype`; scores,
softmax and norm statistics in float32. Defaults match transformers when it is given an
attention_mask and no position_ids: positions 0..T-1 for every row (so right padding keeps each
row's real positions), padded keys masked out.

Packed rows: with `segment_ids` (B, T) in the batch, a token attends only to earlier tokens of its
own non-zero segment (0 = padding), and positions restart per segment (from `position_ids` when
given). KV-cached decoding: with `cache` (one {'k', 'v'} (B, S, K, D) per layer) and
`cache_index` in the batch, the call writes its keys and values at slots cache_index .. + T - 1,
attends over the whole cache (attention_mask then (B, S)) and returns (logits, updated cache);
`models.generate` drives it.

Example:
  >>> cfg = hf_io.read_config("ckpt/")
  >>> module = build(cfg, "causal_lm", dtype=jnp.bfloat16)
  >>> logits_BxTxV = module.apply({"params": params}, {"input_ids": ids, "attention_mask": mask})
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
from flax import linen as nn

from doran_jax.errors import ConfigError
from doran_jax.models.modeling import layers
from doran_jax.models.modeling import rope as rope_lib

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")
TASKS = ("causal_lm", "classification", "features")
FULL, SLIDING = "full_attention", "sliding_attention"

# Defaults of each family's transformers config class, for config.json files that omit a key.
_TIE_DEFAULT = {"llama": False, "mistral": False, "qwen2": False, "qwen3": False,
                "gemma3_text": True}


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """The switches of one checkpoint, read from its transformers config dict by `from_hf`.

  Hashable (tuples only), so it can sit on a linen module and in jit static arguments.
  """

  model_type: str
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  max_position_embeddings: int
  norm_eps: float
  activation: str
  qkv_bias: bool
  o_bias: bool
  mlp_bias: bool
  qk_norm: bool
  gemma: bool                        # Gemma's norms, sandwich layer and embedding scale
  attn_scale: float
  attn_softcap: Optional[float]
  final_softcap: Optional[float]
  attention_dropout: float
  layer_types: tuple[str, ...]
  windows: tuple[Optional[int], ...]
  ropes: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...]   # layer type -> rope params
  tie_word_embeddings: bool
  memory_lean: bool = True           # fused attention and GELU (layers.attention_implementation)
  remat: bool = False                # keep only each block's input for the backward pass

  @classmethod
  def from_hf(cls, cfg: Mapping[str, Any]) -> "DecoderConfig":
    """Reads a transformers config dict (4.x or 5.x keys).

    Example:
      >>> DecoderConfig.from_hf(hf_io.read_config("ckpt/")).layer_types
      ('full_attention', 'full_attention')
    """
    model_type = cfg.get("model_type")
    if model_type not in MODEL_TYPES:
      raise ValueError(f"model_type {model_type!r} is not a decoder of this family; supported: "
                       f"{', '.join(MODEL_TYPES)}.")
    if cfg.get("use_bidirectional_attention"):
      raise ConfigError("use_bidirectional_attention (EmbeddingGemma) is not supported: this "
                        "decoder is causal. Use a causal Gemma 3 checkpoint.")
    heads = int(cfg["num_attention_heads"])
    hd = rope_lib.head_dim(cfg)
    gemma = model_type == "gemma3_text"
    n = int(cfg["num_hidden_layers"])
    types = _layer_types(cfg, model_type, n)
    window = cfg.get("sliding_window")
    windows = tuple(int(window) if t == SLIDING and window else None for t in types)
    ropes = tuple((t, tuple(sorted(rope_lib.rope_parameters(cfg, t).items())))
                  for t in sorted(set(types)))
    attention_bias = bool(cfg.get("attention_bias", False))
    return cls(
        model_type=model_type, vocab_size=int(cfg["vocab_size"]),
        hidden_size=int(cfg["hidden_size"]), intermediate_size=int(cfg["intermediate_size"]),
        num_layers=n, num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads), head_dim=hd,
        max_position_embeddings=int(cfg["max_position_embeddings"]),
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        activation=cfg.get("hidden_activation") or cfg.get("hidden_act") or "silu",
        # Qwen2 always has q/k/v biases and never an o bias; the others follow attention_bias.
        qkv_bias=True if model_type == "qwen2" else attention_bias,
        o_bias=False if model_type == "qwen2" else attention_bias,
        mlp_bias=bool(cfg.get("mlp_bias", False)) if model_type == "llama" else False,
        qk_norm=model_type in ("qwen3", "gemma3_text"), gemma=gemma,
        attn_scale=float(cfg["query_pre_attn_scalar"]) ** -0.5 if gemma else hd ** -0.5,
        # Gemma 3's config carries attn_logit_softcapping (null in the released checkpoints)
        # but transformers' Gemma 3 attention never applies it, so neither do we; the field is
        # for a family that does (Gemma 2).
        attn_softcap=None,
        final_softcap=cfg.get("final_logit_softcapping") if gemma else None,
        attention_dropout=float(cfg.get("attention_dropout", 0.0) or 0.0),
        layer_types=types, windows=windows, ropes=ropes,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", _TIE_DEFAULT[model_type])))

  def rope(self, layer_type: str) -> dict:
    return dict(dict(self.ropes)[layer_type])

  def rope_cfg(self) -> dict:
    """The keys `rope.inv_freq` reads."""
    return {"head_dim": self.head_dim, "hidden_size": self.hidden_size,
            "num_attention_heads": self.num_heads,
            "max_position_embeddings": self.max_position_embeddings}


def _layer_types(cfg: Mapping[str, Any], model_type: str, n: int) -> tuple[str, ...]:
  """Per layer 'full_attention' or 'sliding_attention', as each family's config derives it."""
  if cfg.get("layer_types"):
    types = tuple(cfg["layer_types"])
    if len(types) != n or set(types) - {FULL, SLIDING}:
      raise ConfigError(f"layer_types {types} must list {n} of {FULL!r} / {SLIDING!r}.")
    return types
  if model_type == "gemma3_text":
    pattern = int(cfg.get("sliding_window_pattern") or cfg.get("_sliding_window_pattern") or 6)
    return tuple(SLIDING if (i + 1) % pattern else FULL for i in range(n))
  if model_type in ("qwen2", "qwen3"):
    on = cfg.get("use_sliding_window", False) and cfg.get("sliding_window")
    first = int(cfg.get("max_window_layers", n) or 0)
    return tuple(SLIDING if on and i >= first else FULL for i in range(n))
  # Mistral: one window for every layer when set; Llama has none.
  return tuple(SLIDING if cfg.get("sliding_window") else FULL for _ in range(n))


def _norm(c: DecoderConfig, name: str, dtype) -> layers.RMSNorm:
  return layers.RMSNorm(c.norm_eps, scale_offset=1.0 if c.gemma else 0.0,
                        scale_in_float32=c.gemma, dtype=dtype, name=name)


class Attention(nn.Module):
  """Self-attention with GQA, optional q/k norm, RoPE tables given, causal (+ window) mask."""

  config: DecoderConfig
  window: Optional[int] = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxTxD, cos_BxTxR, sin_BxTxR, mask, *, train: bool = False,
               cache=None, cache_index=None):
    """Without a cache: `mask` is (B, T) key padding or (B, 1, T, T) (packed rows); causal and
    window masks are added here. With `cache` ({'k', 'v'}: (B, S, K, D)): this call's keys and
    values are written at slots cache_index .. + T - 1, `mask` is the full (B, 1, T, S) mask
    (`layers.cache_mask`), and the updated cache is returned with the output."""
    c = self.config
    b, t, _ = x_BxTxD.shape
    h, k, d = c.num_heads, c.num_kv_heads, c.head_dim

    def proj(features, name, bias):
      return layers.dense(features, name=name, use_bias=bias, dtype=self.dtype,
                          param_dtype=self.param_dtype)

    q_BxTxHxD = proj(h * d, "q_proj", c.qkv_bias)(x_BxTxD).reshape(b, t, h, d)
    k_BxTxKxD = proj(k * d, "k_proj", c.qkv_bias)(x_BxTxD).reshape(b, t, k, d)
    v_BxTxKxD = proj(k * d, "v_proj", c.qkv_bias)(x_BxTxD).reshape(b, t, k, d)
    if c.qk_norm:
      # Per head, over head_dim, before the rotation (Qwen 3, Gemma 3).
      q_BxTxHxD = _norm(c, "q_norm", self.dtype)(q_BxTxHxD)
      k_BxTxKxD = _norm(c, "k_norm", self.dtype)(k_BxTxKxD)
    q_BxTxHxD = rope_lib.rotate(q_BxTxHxD, cos_BxTxR, sin_BxTxR)
    k_BxTxKxD = rope_lib.rotate(k_BxTxKxD, cos_BxTxR, sin_BxTxR)
    if cache is not None:
      cache = layers.write_cache(cache, k_BxTxKxD, v_BxTxKxD, cache_index)
      # The mask already holds causality and the window, aligned to the cache slots.
      out_BxTxHxD = layers.dot_product_attention(
          q_BxTxHxD, cache["k"], cache["v"], mask=mask, scale=c.attn_scale,
          logit_softcap=c.attn_softcap, dtype=self.dtype, implementation="xla")
      return proj(c.hidden_size, "o_proj", c.o_bias)(out_BxTxHxD.reshape(b, t, h * d)), cache
    rate = c.attention_dropout if train else 0.0
    out_BxTxHxD = layers.dot_product_attention(
        q_BxTxHxD, k_BxTxKxD, v_BxTxKxD, mask=mask, causal=True, scale=c.attn_scale,
        logit_softcap=c.attn_softcap, window=self.window, dropout_rate=rate,
        dropout_rng=self.make_rng("dropout") if rate > 0 else None, dtype=self.dtype,
        implementation=layers.attention_implementation(c.memory_lean))
    return proj(c.hidden_size, "o_proj", c.o_bias)(out_BxTxHxD.reshape(b, t, h * d))


class MLP(nn.Module):
  """Gated MLP: down(act(gate(x)) * up(x))."""

  config: DecoderConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxTxD):
    c = self.config

    def proj(features, name):
      return layers.dense(features, name=name, use_bias=c.mlp_bias, dtype=self.dtype,
                          param_dtype=self.param_dtype)

    act = layers.activation(c.activation, c.memory_lean)
    gate_BxTxF = act(proj(c.intermediate_size, "gate_proj")(x_BxTxD))
    up_BxTxF = proj(c.intermediate_size, "up_proj")(x_BxTxD)
    return proj(c.hidden_size, "down_proj")(gate_BxTxF * up_BxTxF)


class DecoderLayer(nn.Module):
  """Pre-norm block; Gemma adds a norm after attention and after the MLP (four per layer)."""

  config: DecoderConfig
  index: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxTxD, tables, mask, train: bool = False, cache=None, cache_index=None):
    c = self.config
    cos_BxTxR, sin_BxTxR = tables[c.layer_types[self.index]]
    attn = Attention(c, window=c.windows[self.index], dtype=self.dtype,
                     param_dtype=self.param_dtype, name="self_attn")
    a_BxTxD = attn(_norm(c, "input_layernorm", self.dtype)(x_BxTxD), cos_BxTxR, sin_BxTxR,
                   mask, train=train, cache=cache, cache_index=cache_index)
    if cache is not None:
      a_BxTxD, cache = a_BxTxD
    if c.gemma:
      a_BxTxD = _norm(c, "post_attention_layernorm", self.dtype)(a_BxTxD)
    x_BxTxD = x_BxTxD + a_BxTxD
    pre = "pre_feedforward_layernorm" if c.gemma else "post_attention_layernorm"
    m_BxTxD = MLP(c, dtype=self.dtype, param_dtype=self.param_dtype, name="mlp")(
        _norm(c, pre, self.dtype)(x_BxTxD))
    if c.gemma:
      m_BxTxD = _norm(c, "post_feedforward_layernorm", self.dtype)(m_BxTxD)
    if cache is not None:
      return x_BxTxD + m_BxTxD, cache
    return x_BxTxD + m_BxTxD


class _Layers(nn.Module):
  """Holds the blocks as children '0', '1', ... so their paths read `layers/3/...`."""

  config: DecoderConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxTxD, tables, masks, *, train: bool = False, cache=None,
               cache_index=None):
    """`masks`: window (None = full) -> that layer type's mask. With `cache` (one {'k', 'v'}
    per layer) returns (x, updated cache)."""
    c = self.config
    if cache is not None:
      # Decoding is never differentiated: no remat, and the per-layer caches go in and out.
      new_cache = []
      for i in range(c.num_layers):
        x_BxTxD, layer_cache = DecoderLayer(c, i, dtype=self.dtype, param_dtype=self.param_dtype,
                                            name=str(i))(x_BxTxD, tables, masks[c.windows[i]],
                                                         False, cache[i], cache_index)
        new_cache.append(layer_cache)
      return x_BxTxD, tuple(new_cache)
    # `train` (arg 4 counting self) is static under remat: it switches dropout.
    block = nn.remat(DecoderLayer, static_argnums=(4,)) if c.remat else DecoderLayer
    for i in range(c.num_layers):
      x_BxTxD = block(c, i, dtype=self.dtype, param_dtype=self.param_dtype,
                      name=str(i))(x_BxTxD, tables, masks[c.windows[i]], train)
    return x_BxTxD


def _positions(batch: Mapping[str, Any], b: int, t: int):
  if batch.get("position_ids") is not None:
    return jnp.broadcast_to(jnp.asarray(batch["position_ids"]), (b, t))
  if batch.get("segment_ids") is not None:
    return layers.segment_positions(batch["segment_ids"])
  # transformers' default with an attention_mask and no position_ids: 0..T-1 on every row.
  return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))


class DecoderModel(nn.Module):
  """The bare decoder (torch's `LlamaModel`): final-norm hidden states (B, T, d).

  Params: `embed_tokens/embedding`, `layers/<i>/...`, `norm/scale`. Under the task modules it
  sits at `model/`.

  Example:
    >>> h_BxTxD = DecoderModel(DecoderConfig.from_hf(cfg)).apply(variables, batch)
  """

  config: DecoderConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    c = self.config
    self.embed_tokens = layers.embed(c.vocab_size, c.hidden_size, name="embed_tokens",
                                     dtype=self.dtype, param_dtype=self.param_dtype)
    self.layers = _Layers(c, dtype=self.dtype, param_dtype=self.param_dtype)
    self.norm = _norm(c, "norm", self.dtype)

  def __call__(self, batch: dict, *, train: bool = False):
    """Hidden states (B, T, d); (hidden states, updated cache) when the batch has a `cache`.

    Batch keys: input_ids, attention_mask, position_ids, segment_ids (packed rows: attention only
    within a non-zero segment id; positions then restart per segment unless given), and for
    cached decoding `cache` (`generate.CacheSpec.init`) with `cache_index` (the slot of
    input_ids[:, 0]); attention_mask then covers the cache's S slots (1 = a real token, this
    call's included).
    """
    c = self.config
    ids_BxT = jnp.asarray(batch["input_ids"])
    b, t = ids_BxT.shape
    cache = batch.get("cache")
    positions_BxT = _positions(batch, b, t)
    if cache is not None:
      index = jnp.asarray(batch["cache_index"], jnp.int32)
      key_mask_BxS = layers.cache_keys(batch)
      masks = {w: layers.cache_mask(key_mask_BxS, index, t, w) for w in set(c.windows)}
    else:
      mask = layers.attention_keys(batch)
      masks = {w: mask for w in set(c.windows)}
    x_BxTxD = self.embed_tokens(ids_BxT)
    if c.gemma:
      x_BxTxD = x_BxTxD * jnp.asarray(math.sqrt(c.hidden_size), self.dtype)
    # One cos/sin table per layer type; 'dynamic' rope depends on the batch's max position.
    seq_len = jnp.max(positions_BxT) + 1
    tables = {}
    for layer_type in set(c.layer_types):
      rp = c.rope(layer_type)
      inv_freq_F, scaling = rope_lib.inv_freq(c.rope_cfg(), rp, seq_len)
      tables[layer_type] = rope_lib.cos_sin(positions_BxT, inv_freq_F, scaling, self.dtype)
    if cache is not None:
      x_BxTxD, cache = self.layers(x_BxTxD, tables, masks, cache=tuple(cache), cache_index=index)
      return self.norm(x_BxTxD), cache
    x_BxTxD = self.layers(x_BxTxD, tables, masks, train=train)
    return self.norm(x_BxTxD)

  def attend(self, h_BxTxD):
    """Tied output projection: h @ embedding.T in the compute dtype."""
    return self.embed_tokens.attend(h_BxTxD)


class DecoderForCausalLM(nn.Module):
  """Logits (B, T, V), or (B, K, V) at `logit_positions` (B, K) when the batch has them; `lm_head`
  Dense without bias, or the tied embedding. With a `cache` in the batch: (logits, updated cache)
  (a prefill that needs its last position only passes `logit_positions` (B, 1)).

  Example:
    >>> logits_BxTxV = DecoderForCausalLM(config).apply(variables, batch)
  """

  config: DecoderConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, batch: dict, *, train: bool = False):
    c = self.config
    model = DecoderModel(c, dtype=self.dtype, param_dtype=self.param_dtype, name="model")
    h_BxTxD = model(batch, train=train)
    cache = None
    if batch.get("cache") is not None:
      h_BxTxD, cache = h_BxTxD
    h_BxTxD = layers.at_logit_positions(h_BxTxD, batch)   # (B, K, D) at the target positions
    if c.tie_word_embeddings:
      logits_BxTxV = model.attend(h_BxTxD)
    else:
      logits_BxTxV = layers.dense(c.vocab_size, name="lm_head", use_bias=False, dtype=self.dtype,
                                  param_dtype=self.param_dtype)(h_BxTxD)
    if c.final_softcap:
      cap = float(c.final_softcap)
      logits_BxTxV = (cap * jnp.tanh(logits_BxTxV.astype(jnp.float32) / cap)).astype(self.dtype)
    return logits_BxTxV if cache is None else (logits_BxTxV, cache)


class DecoderForSequenceClassification(nn.Module):
  """Logits (B, num_labels) from `score` (Dense, no bias) at each row's last real token.

  The last real token is the rightmost position with attention_mask 1 (the last position when
  there is no mask). transformers finds it as the rightmost token != pad_token_id; the two agree
  whenever pad tokens are exactly the masked ones.

  Example:
    >>> logits_BxL = DecoderForSequenceClassification(config, num_labels=3).apply(variables, batch)
  """

  config: DecoderConfig
  num_labels: int = 2
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, batch: dict, *, train: bool = False):
    h_BxTxD = DecoderModel(self.config, dtype=self.dtype, param_dtype=self.param_dtype,
                           name="model")(batch, train=train)
    b, t, _ = h_BxTxD.shape
    mask_BxT = layers.padding_mask(batch).astype(jnp.int32)
    last_B = jnp.argmax(jnp.arange(t, dtype=jnp.int32) * mask_BxT, axis=-1)
    pooled_BxD = h_BxTxD[jnp.arange(b), last_B]
    return layers.dense(self.num_labels, name="score", use_bias=False, dtype=self.dtype,
                        param_dtype=self.param_dtype)(pooled_BxD)


# ------------------------------------------------------------------------------- file-level API

def build(hf_config_dict: Mapping[str, Any], task: str, *, dtype=jnp.float32,
          num_labels: Optional[int] = None, param_dtype=jnp.float32,
          memory_lean: bool = True, remat: bool = False) -> nn.Module:
  """The module for a transformers config dict and a task.

  Args:
    hf_config_dict: `config.json` as a dict (model_type in MODEL_TYPES).
    task: 'causal_lm' (logits (B, T, V)), 'classification' (logits (B, num_labels)) or
      'features' (final-norm hidden states (B, T, d); params without the `model/` prefix).
    dtype: compute dtype.
    num_labels: classification only; defaults to the config's id2label size, else 2.
    param_dtype: dtype of freshly initialised params (loaded params keep theirs).
    memory_lean: the backend's fused attention (cuDNN flash on GPU; on CPU causal attention is
      plain XLA either way) and the custom-VJP exact GELU; False = plain XLA autodiff (config
      `model.fused_layers`). Same maths and params either way.
    remat: recompute each block's activations in the backward pass (config `model.remat`).

  Example:
    >>> module = build(hf_io.read_config("ckpt/"), "causal_lm", dtype=jnp.bfloat16)
    >>> logits = module.apply({"params": params}, {"input_ids": ids, "attention_mask": mask})
  """
  config = dataclasses.replace(DecoderConfig.from_hf(hf_config_dict),
                               memory_lean=bool(memory_lean), remat=bool(remat))
  kw = dict(dtype=dtype, param_dtype=param_dtype)
  if task == "causal_lm":
    return DecoderForCausalLM(config, **kw)
  if task == "classification":
    if num_labels is None:
      num_labels = len(hf_config_dict.get("id2label") or {}) or 2
    return DecoderForSequenceClassification(config, num_labels=int(num_labels), **kw)
  if task == "features":
    return DecoderModel(config, **kw)
  raise ValueError(f"task {task!r} is not supported by the decoder; supported: {', '.join(TASKS)}.")


def cache_shape(hf_config_dict: Mapping[str, Any]) -> tuple[int, int, int]:
  """(layers, key/value heads, head dim): the KV cache's per-layer (B, S, K, D) without B, S.

  Example:
    >>> cache_shape(hf_io.read_config("smollm2-folder/"))
    (30, 3, 64)
  """
  c = DecoderConfig.from_hf(hf_config_dict)
  return c.num_layers, c.num_kv_heads, c.head_dim


def tied_params(hf_config_dict: Mapping[str, Any], task: str) -> list[tuple[str, str]]:
  """(our_path, source_path) pairs that transformers ties.

  With `tie_word_embeddings`, torch's `lm_head.weight` is the embedding; our causal-LM module
  then has no `lm_head/kernel` at all (the logits read the embedding), so the pair only records
  the tie: hf_io.to_flax skips a pair whose path the model lacks, and an export needs not write
  it (transformers re-ties on load).

  Example:
    >>> tied_params({"model_type": "gemma3_text", ...}, "causal_lm")
    [('lm_head/kernel', 'model/embed_tokens/embedding')]
  """
  model_type = hf_config_dict.get("model_type")
  tie = hf_config_dict.get("tie_word_embeddings", _TIE_DEFAULT.get(model_type, False))
  if task == "causal_lm" and tie:
    return [("lm_head/kernel", "model/embed_tokens/embedding")]
  return []


def head_regex(task: str) -> str:
  """Regex of the task head's params (fresh at load, trained with the adapters); '' = none.

  Example:
    >>> head_regex("classification")
    'score/.*'
  """
  return {"classification": r"score/.*"}.get(task, "")


def greedy_generate(module: nn.Module, params, input_ids, attention_mask=None,
                    max_new_tokens: int = 16, *, eos_token_id: Optional[int] = None,
                    pad_token_id: int = 0):
  """Greedy decoding without a KV cache: the whole forward on a fixed buffer per new token.

  Prompts are right-padded (attention_mask a prefix of ones per row); row b's new tokens go right
  after its own prompt, at positions len_b, len_b + 1, ..., exactly as if it were decoded alone.
  After `eos_token_id` a row emits `pad_token_id`, as transformers' `generate` does. One jit of
  `generate.greedy_generate`'s loop; cost grows as (T + N)^2 per step, fine for evaluation-sized
  outputs.

  Args:
    module: a causal-LM module from `build(..., "causal_lm")`.
    params: its params (the `params` collection, not wrapped).
    input_ids: (B, T) prompts, right-padded.
    attention_mask: (B, T), 1 on prompt tokens; None = all ones.
    max_new_tokens: N.

  Returns:
    (B, T + N) int32 tokens: row b holds its prompt, then its N new tokens, then padding.

  Example:
    >>> out = greedy_generate(module, params, ids, mask, max_new_tokens=8)
    >>> new_b = out[b, len_b:len_b + 8]
  """
  # The loop is models/generate.py's, shared with GPT-2; imported here to avoid a cycle.
  from doran_jax.models import generate  # pylint: disable=import-outside-toplevel
  return jax.jit(lambda p, i, m: generate.greedy_generate(
      lambda q, batch: module.apply({"params": q}, batch), p, i, m, max_new_tokens,
      eos_token_id=eos_token_id, pad_token_id=pad_token_id))(params, input_ids, attention_mask)
