"""GPT-2 (pre-LN causal decoder) for causal LM, sequence classification and features.

Param paths are transformers' PyTorch names with '.' -> '/':
  causal_lm       transformer/wte/embedding, transformer/h/0/attn/c_attn/kernel (d, 3d),
                  transformer/ln_f/scale; the LM head is wte (x · wteᵀ, no lm_head param) unless
                  the config sets tie_word_embeddings=False (then lm_head/kernel (d, V))
  classification  transformer/..., score/kernel (no bias)   (GPT2ForSequenceClassification)
  features        the bare GPT2Model's names without the prefix: wte/..., h/0/..., ln_f/...
torch's Conv1D already stores (in, out), so those kernels are not transposed (NO_TRANSPOSE).

Packed rows (`segment_ids`) and KV-cached decoding (`cache`, `cache_index`) take the same batch
keys as the decoder families (modeling/decoder.py). Positions are 0..T-1 unless the batch has
`position_ids` (transformers' forward does the same; its generate() derives them from the mask
for left padding) or `segment_ids` (they restart per segment). Like transformers,
`token_type_ids`, if given, are embedded with wte and added.

Example:
  >>> model = build(read_config(path), "causal_lm")
  >>> logits = model.apply({"params": params}, {"input_ids": ids, "attention_mask": mask})
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from doran_jax.errors import ConfigError
from doran_jax.models.modeling import layers
from doran_jax.models.modeling.bert import num_labels_of

MODEL_TYPES = ("gpt2",)
TASKS = ("causal_lm", "classification", "features")
NO_TRANSPOSE = r"(.*/)?(c_attn|c_proj|c_fc)/kernel"
RENAMES = ()


@dataclasses.dataclass(frozen=True)
class GPT2Config:
  """The fields of a transformers GPT2Config the model reads."""

  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  max_positions: int
  intermediate_size: int
  activation: str = "gelu_new"
  layer_norm_eps: float = 1e-5
  resid_dropout: float = 0.1
  embd_dropout: float = 0.1
  attn_dropout: float = 0.1
  scale_attn_weights: bool = True
  scale_attn_by_inverse_layer_idx: bool = False
  initializer_range: float = 0.02
  pad_token_id: Optional[int] = None
  tie_word_embeddings: bool = True
  num_labels: int = 2
  remat: bool = False
  memory_lean: bool = True   # fused attention and GELU (layers.attention_implementation)

  @classmethod
  def from_hf(cls, d: Mapping[str, Any], num_labels: Optional[int] = None,
              remat: bool = False) -> "GPT2Config":
    if d.get("model_type") not in MODEL_TYPES:
      raise ValueError(f"gpt2.py reads model_type 'gpt2'; got {d.get('model_type')!r}.")
    if d.get("add_cross_attention"):
      raise ConfigError("GPT-2 with cross-attention (add_cross_attention) is not supported.")
    width = d.get("n_embd", 768)
    return cls(
        vocab_size=d["vocab_size"], hidden_size=width, num_layers=d.get("n_layer", 12),
        num_heads=d.get("n_head", 12), max_positions=d.get("n_positions", 1024),
        intermediate_size=d.get("n_inner") or 4 * width,
        activation=d.get("activation_function", "gelu_new"),
        layer_norm_eps=d.get("layer_norm_epsilon", 1e-5),
        resid_dropout=d.get("resid_pdrop", 0.1), embd_dropout=d.get("embd_pdrop", 0.1),
        attn_dropout=d.get("attn_pdrop", 0.1),
        scale_attn_weights=d.get("scale_attn_weights", True),
        scale_attn_by_inverse_layer_idx=d.get("scale_attn_by_inverse_layer_idx", False),
        initializer_range=d.get("initializer_range", 0.02), pad_token_id=d.get("pad_token_id"),
        tie_word_embeddings=d.get("tie_word_embeddings", True),
        num_labels=num_labels_of(d, num_labels), remat=remat)


class Attention(nn.Module):
  cfg: GPT2Config
  layer_idx: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxTxD, mask, train: bool, cache=None, cache_index=None):
    """`mask`: (B, T) key padding or (B, 1, T, T) (packed rows), causality added here; with
    `cache` ({'k', 'v'}: (B, S, H, D)) the full (B, 1, T, S) mask (`layers.cache_mask`), and the
    updated cache is returned with the output."""
    c = self.cfg
    b, t, d = x_BxTxD.shape
    head = d // c.num_heads
    kw = dict(dtype=self.dtype, std=c.initializer_range)
    qkv = layers.dense(3 * d, name="c_attn", **kw)(x_BxTxD)
    q, k, v = (y.reshape(b, t, c.num_heads, head) for y in jnp.split(qkv, 3, axis=-1))
    scale = head ** -0.5 if c.scale_attn_weights else 1.0
    if c.scale_attn_by_inverse_layer_idx:
      scale /= self.layer_idx + 1
    if cache is not None:
      cache = layers.write_cache(cache, k, v, cache_index)
      out = layers.dot_product_attention(q, cache["k"], cache["v"], mask=mask, scale=scale,
                                         implementation="xla")
      return layers.dense(d, name="c_proj", **kw)(out.reshape(b, t, d)), cache
    rate = c.attn_dropout if train else 0.0
    out = layers.dot_product_attention(
        q, k, v, mask=mask, causal=True, scale=scale, dropout_rate=rate,
        dropout_rng=self.make_rng("dropout") if rate > 0 else None,
        implementation=layers.attention_implementation(c.memory_lean))
    out = layers.dense(d, name="c_proj", **kw)(out.reshape(b, t, d))
    return layers.dropout(c.resid_dropout, out, self, train)


class MLP(nn.Module):
  cfg: GPT2Config
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    c = self.cfg
    kw = dict(dtype=self.dtype, std=c.initializer_range)
    h = layers.activation(c.activation, c.memory_lean)(layers.dense(c.intermediate_size, name="c_fc", **kw)(x))
    h = layers.dense(c.hidden_size, name="c_proj", **kw)(h)
    return layers.dropout(c.resid_dropout, h, self, train)


class Block(nn.Module):
  cfg: GPT2Config
  layer_idx: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, mask, train: bool, cache=None, cache_index=None):
    c = self.cfg
    ln = lambda name: layers.layer_norm(c.layer_norm_eps, name=name, dtype=self.dtype)
    a = Attention(c, self.layer_idx, self.dtype, name="attn")(ln("ln_1")(x), mask, train,
                                                              cache, cache_index)
    if cache is not None:
      a, cache = a
    x = x + a
    x = x + MLP(c, self.dtype, name="mlp")(ln("ln_2")(x), train)
    return x if cache is None else (x, cache)


class BlockStack(nn.Module):
  """`h/0`, `h/1`, ...: torch's ModuleList names."""

  cfg: GPT2Config
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, mask, train: bool, cache=None, cache_index=None):
    """With `cache` (one {'k', 'v'} per block) returns (x, updated cache)."""
    if cache is not None:
      # Decoding is never differentiated: no remat, and the per-block caches go in and out.
      new_cache = []
      for i in range(self.cfg.num_layers):
        x, layer_cache = Block(self.cfg, i, self.dtype, name=str(i))(x, mask, False, cache[i],
                                                                    cache_index)
        new_cache.append(layer_cache)
      return x, tuple(new_cache)
    # `train` (arg 3 counting self) is static under remat: it switches dropout.
    block = nn.remat(Block, static_argnums=(3,)) if self.cfg.remat else Block
    for i in range(self.cfg.num_layers):
      x = block(self.cfg, i, self.dtype, name=str(i))(x, mask, train)
    return x


class GPT2Model(nn.Module):
  """The bare GPT-2: the last hidden state (B, T, d) after ln_f; `attend` is the tied LM head."""

  cfg: GPT2Config
  dtype: Any = jnp.float32

  def setup(self):
    c = self.cfg
    kw = dict(dtype=self.dtype, std=c.initializer_range)
    self.wte = layers.embed(c.vocab_size, c.hidden_size, name="wte", **kw)
    self.wpe = layers.embed(c.max_positions, c.hidden_size, name="wpe", **kw)
    self.h = BlockStack(c, self.dtype, name="h")
    self.ln_f = layers.layer_norm(c.layer_norm_eps, name="ln_f", dtype=self.dtype)

  def __call__(self, batch: dict, *, train: bool = False):
    """Hidden states (B, T, d); (hidden states, updated cache) when the batch has a `cache`.

    Batch keys as the decoder families' (modeling/decoder.py `DecoderModel`): segment_ids for
    packed rows, `cache` (`generate.CacheSpec.init`) + `cache_index` for cached decoding,
    attention_mask then over the cache's slots.
    """
    ids = jnp.asarray(batch["input_ids"])
    pos = batch.get("position_ids")
    if pos is not None:
      pos = jnp.asarray(pos)
    elif batch.get("segment_ids") is not None:
      pos = layers.segment_positions(batch["segment_ids"])
    else:
      pos = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
    x = self.wte(ids) + self.wpe(pos)
    if batch.get("token_type_ids") is not None:
      x = x + self.wte(jnp.asarray(batch["token_type_ids"]))
    x = layers.dropout(self.cfg.embd_dropout, x, self, train)
    cache = batch.get("cache")
    if cache is None:
      return self.ln_f(self.h(x, layers.attention_keys(batch), train))
    mask = layers.cache_mask(layers.cache_keys(batch), batch["cache_index"], ids.shape[1])
    x, cache = self.h(x, mask, False, tuple(cache), jnp.asarray(batch["cache_index"], jnp.int32))
    return self.ln_f(x), cache

  def attend(self, x_BxTxD):
    """x · wteᵀ: logits (B, T, V) of the LM head tied to the word embedding."""
    return self.wte.attend(x_BxTxD)


class LMHeadModel(nn.Module):
  """GPT2LMHeadModel: logits (B, T, V), or (B, K, V) at `logit_positions` (B, K) when the batch
  has them; tied to wte (no lm_head param) unless the config unties."""

  cfg: GPT2Config
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, batch: dict, *, train: bool = False):
    model = GPT2Model(self.cfg, self.dtype, name="transformer")
    x = model(batch, train=train)
    cache = None
    if batch.get("cache") is not None:
      x, cache = x
    x = layers.at_logit_positions(x, batch)
    if self.cfg.tie_word_embeddings:
      logits = model.attend(x)
    else:
      logits = layers.dense(self.cfg.vocab_size, name="lm_head", use_bias=False, dtype=self.dtype,
                            std=self.cfg.initializer_range)(x)
    return logits if cache is None else (logits, cache)


def last_token_index(input_ids, pad_token_id: Optional[int]):
  """transformers' pooling position: the rightmost token that is not pad (left or right padding)."""
  b, t = input_ids.shape
  if pad_token_id is None:
    if b != 1:
      raise ConfigError("GPT-2 classification of batches > 1 needs config.pad_token_id to find "
                        "each row's last token.")
    return jnp.full((b,), t - 1)
  real = (input_ids != pad_token_id).astype(jnp.int32)
  return jnp.argmax(jnp.arange(t) * real, axis=-1)


class ForSequenceClassification(nn.Module):
  """GPT2ForSequenceClassification: `score` at each row's last non-pad token, (B, num_labels)."""

  cfg: GPT2Config
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, batch: dict, *, train: bool = False):
    c = self.cfg
    x = GPT2Model(c, self.dtype, name="transformer")(batch, train=train)
    # Scored at every position first, as transformers does (same maths, one gather after).
    logits_BxTxC = layers.dense(c.num_labels, name="score", use_bias=False, dtype=self.dtype,
                                std=c.initializer_range)(x)
    last = last_token_index(jnp.asarray(batch["input_ids"]), c.pad_token_id)
    return jnp.take_along_axis(logits_BxTxC, last[:, None, None], axis=1)[:, 0]


# ------------------------------------------------------------------------------------ family API

def build(hf_config_dict: Mapping[str, Any], task: str, *, dtype=jnp.float32,
          num_labels: Optional[int] = None, remat: bool = False,
          memory_lean: bool = True) -> nn.Module:
  """The Flax module for a GPT-2 config dict and task ('causal_lm' | 'classification' | 'features').

  Args:
    memory_lean: the backend's fused attention (memory-lean custom VJP on CPU, cuDNN flash on
      GPU) and the custom-VJP exact GELU; False = plain XLA autodiff (config
      `model.fused_layers`). Same maths and params either way.

  Example:
    >>> model = build(read_config(path), "causal_lm")
  """
  cfg = dataclasses.replace(GPT2Config.from_hf(hf_config_dict, num_labels, remat),
                            memory_lean=bool(memory_lean))
  if task == "causal_lm":
    return LMHeadModel(cfg, dtype)
  if task == "classification":
    return ForSequenceClassification(cfg, dtype)
  if task == "features":
    return GPT2Model(cfg, dtype)
  raise ValueError(f"GPT-2 supports tasks {', '.join(TASKS)}; got {task!r}.")


def prefix(hf_config_dict: Mapping[str, Any]) -> str:
  """transformers' base_model_prefix (for hf_io.to_flax(prefix=...))."""
  del hf_config_dict
  return "transformer"


def cache_shape(hf_config_dict: Mapping[str, Any]) -> tuple[int, int, int]:
  """(layers, heads, head dim) of the KV cache (GPT-2 has as many key/value heads as queries).

  Example:
    >>> cache_shape({"model_type": "gpt2", "n_layer": 12, "n_head": 12, "n_embd": 768, ...})
    (12, 12, 64)
  """
  c = GPT2Config.from_hf(hf_config_dict)
  return c.num_layers, c.num_heads, c.hidden_size // c.num_heads


def tied_params(hf_config_dict: Mapping[str, Any], task: str) -> tuple[tuple[str, str], ...]:
  """(our path, source path) pairs that transformers ties: lm_head is wte unless the config unties.

  Our tied causal-LM module has no `lm_head/kernel` (its logits read wte, as the decoder
  families'), so the pair only records the tie: hf_io.to_flax skips a pair whose path the model
  lacks, and a checkpoint's own lm_head.weight goes unused.

  Example:
    >>> tied_params({"model_type": "gpt2"}, "causal_lm")
    (('lm_head/kernel', 'transformer/wte/embedding'),)
  """
  if task == "causal_lm" and hf_config_dict.get("tie_word_embeddings", True):
    return (("lm_head/kernel", "transformer/wte/embedding"),)
  return ()


def head_regex(task: str) -> str:
  """Regex of the params a fresh task head creates ('' for none; the LM head is tied)."""
  return r"score/.*" if task == "classification" else ""


def dummy_batch(hf_config_dict: Mapping[str, Any], batch: int = 1, seq: int = 8) -> dict:
  """Inputs of the right shapes and dtypes for `module.init` / `jax.eval_shape`."""
  del hf_config_dict
  ids = np.full((batch, seq), 5, np.int32)
  return {"input_ids": ids, "attention_mask": np.ones_like(ids)}
