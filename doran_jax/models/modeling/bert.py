"""BERT (incl. all-MiniLM-L6-v2, a BertModel) and RoBERTa: one post-LN encoder, family switches.

Param paths are transformers' PyTorch names with '.' -> '/' (see doran_jax.models.hf_io):
  classification  BertForSequenceClassification: bert/embeddings/word_embeddings/embedding,
                  bert/encoder/layer/0/attention/self/query/kernel, bert/pooler/dense/kernel,
                  classifier/kernel. RobertaForSequenceClassification: roberta/...,
                  classifier/dense/kernel, classifier/out_proj/kernel (no pooler).
  features        the bare model's names, without the prefix: embeddings/..., encoder/... (a
                  torch BertModel's state dict; its pooler is not built, so a checkpoint's pooler
                  goes unused).

Example:
  >>> model = build(read_config(path), "classification", num_labels=3)
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

MODEL_TYPES = ("bert", "roberta")
TASKS = ("classification", "features")
NO_TRANSPOSE = r""
# Checkpoints written before transformers 2 name LayerNorm's weight/bias gamma/beta.
RENAMES = ((r"LayerNorm\.gamma$", "LayerNorm.weight"), (r"LayerNorm\.beta$", "LayerNorm.bias"))


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
  """The fields of a transformers BertConfig / RobertaConfig the encoder reads."""

  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  intermediate_size: int
  hidden_act: str = "gelu"
  max_positions: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  hidden_dropout: float = 0.1
  attention_dropout: float = 0.1
  classifier_dropout: Optional[float] = None
  initializer_range: float = 0.02
  pad_token_id: int = 0
  roberta: bool = False
  num_labels: int = 2
  remat: bool = False
  memory_lean: bool = True   # fused attention and GELU (layers.attention_implementation)

  @classmethod
  def from_hf(cls, d: Mapping[str, Any], num_labels: Optional[int] = None,
              remat: bool = False) -> "EncoderConfig":
    if d.get("model_type") not in MODEL_TYPES:
      raise ValueError(f"bert.py reads model_type {', '.join(MODEL_TYPES)}; got "
                       f"{d.get('model_type')!r}.")
    kind = d.get("position_embedding_type", "absolute") or "absolute"
    if kind != "absolute":
      raise ConfigError(f"position_embedding_type {kind!r} is not supported (only 'absolute').")
    if d["hidden_size"] % d["num_attention_heads"]:
      raise ConfigError(f"hidden_size {d['hidden_size']} is not a multiple of "
                        f"num_attention_heads {d['num_attention_heads']}.")
    return cls(
        vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
        num_layers=d["num_hidden_layers"], num_heads=d["num_attention_heads"],
        intermediate_size=d["intermediate_size"], hidden_act=d.get("hidden_act", "gelu"),
        max_positions=d.get("max_position_embeddings", 512),
        type_vocab_size=d.get("type_vocab_size", 2),
        layer_norm_eps=d.get("layer_norm_eps", 1e-12),
        hidden_dropout=d.get("hidden_dropout_prob", 0.1),
        attention_dropout=d.get("attention_probs_dropout_prob", 0.1),
        classifier_dropout=d.get("classifier_dropout"),
        initializer_range=d.get("initializer_range", 0.02),
        pad_token_id=d.get("pad_token_id", 0) if d.get("pad_token_id") is not None else 0,
        roberta=d["model_type"] == "roberta",
        num_labels=num_labels_of(d, num_labels), remat=remat)


def num_labels_of(d: Mapping[str, Any], num_labels: Optional[int] = None) -> int:
  """`num_labels` if given, else the config's (config.json stores it as `id2label`), else 2."""
  if num_labels is not None:
    return int(num_labels)
  if d.get("num_labels") is not None:
    return int(d["num_labels"])
  if d.get("id2label"):
    return len(d["id2label"])
  return 2


def roberta_position_ids(input_ids, pad_token_id: int):
  """RoBERTa's positions: pad + 1, pad + 2, ... over non-pad tokens; pad tokens get pad."""
  real = (input_ids != pad_token_id).astype(jnp.int32)
  return jnp.cumsum(real, axis=1) * real + pad_token_id


class Embeddings(nn.Module):
  cfg: EncoderConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, batch: dict, train: bool):
    c = self.cfg
    ids = jnp.asarray(batch["input_ids"])
    if batch.get("position_ids") is not None:
      pos = jnp.asarray(batch["position_ids"])
    elif c.roberta:
      pos = roberta_position_ids(ids, c.pad_token_id)
    else:
      pos = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
    types = batch.get("token_type_ids")
    types = jnp.zeros_like(ids) if types is None else jnp.asarray(types)
    kw = dict(dtype=self.dtype, std=c.initializer_range)
    x = (layers.embed(c.vocab_size, c.hidden_size, name="word_embeddings", **kw)(ids)
         + layers.embed(c.type_vocab_size, c.hidden_size, name="token_type_embeddings", **kw)(types)
         + layers.embed(c.max_positions, c.hidden_size, name="position_embeddings", **kw)(pos))
    x = layers.layer_norm(c.layer_norm_eps, name="LayerNorm", dtype=self.dtype)(x)
    return layers.dropout(c.hidden_dropout, x, self, train)


class SelfAttention(nn.Module):
  cfg: EncoderConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxTxD, mask_BxT, train: bool):
    c = self.cfg
    b, t, _ = x_BxTxD.shape
    head = c.hidden_size // c.num_heads
    kw = dict(dtype=self.dtype, std=c.initializer_range)
    q, k, v = (layers.dense(c.hidden_size, name=n, **kw)(x_BxTxD).reshape(b, t, c.num_heads, head)
               for n in ("query", "key", "value"))
    rate = c.attention_dropout if train else 0.0
    out = layers.dot_product_attention(
        q, k, v, mask=mask_BxT, dropout_rate=rate,
        dropout_rng=self.make_rng("dropout") if rate > 0 else None,
        implementation=layers.attention_implementation(c.memory_lean))
    return out.reshape(b, t, c.hidden_size)


class AddNorm(nn.Module):
  """dense -> dropout -> LayerNorm(· + residual): BERT's SelfOutput and Output blocks."""

  cfg: EncoderConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, residual, train: bool):
    c = self.cfg
    x = layers.dense(c.hidden_size, name="dense", dtype=self.dtype, std=c.initializer_range)(x)
    x = layers.dropout(c.hidden_dropout, x, self, train)
    return layers.layer_norm(c.layer_norm_eps, name="LayerNorm", dtype=self.dtype)(x + residual)


class Attention(nn.Module):
  cfg: EncoderConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, mask, train: bool):
    a = SelfAttention(self.cfg, self.dtype, name="self")(x, mask, train)
    return AddNorm(self.cfg, self.dtype, name="output")(a, x, train)


class Intermediate(nn.Module):
  cfg: EncoderConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = self.cfg
    x = layers.dense(c.intermediate_size, name="dense", dtype=self.dtype, std=c.initializer_range)(x)
    return layers.activation(c.hidden_act, c.memory_lean)(x)


class Layer(nn.Module):
  cfg: EncoderConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, mask, train: bool):
    a = Attention(self.cfg, self.dtype, name="attention")(x, mask, train)
    h = Intermediate(self.cfg, self.dtype, name="intermediate")(a)
    return AddNorm(self.cfg, self.dtype, name="output")(h, a, train)


class LayerStack(nn.Module):
  """`layer/0`, `layer/1`, ...: torch's ModuleList names."""

  cfg: EncoderConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, mask, train: bool):
    # remat keeps only each block's input for the backward pass; `train` (arg 3 counting self)
    # is static because it switches dropout on and off.
    block = nn.remat(Layer, static_argnums=(3,)) if self.cfg.remat else Layer
    for i in range(self.cfg.num_layers):
      x = block(self.cfg, self.dtype, name=str(i))(x, mask, train)
    return x


class Encoder(nn.Module):
  cfg: EncoderConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, mask, train: bool):
    return LayerStack(self.cfg, self.dtype, name="layer")(x, mask, train)


class BertModel(nn.Module):
  """The bare encoder: embeddings + encoder (+ pooler).

  Returns the last hidden state (B, T, d); with `add_pooler`, (hidden state, pooled (B, d)).
  """

  cfg: EncoderConfig
  dtype: Any = jnp.float32
  add_pooler: bool = False

  @nn.compact
  def __call__(self, batch: dict, *, train: bool = False):
    mask = layers.padding_mask(batch)
    x = Embeddings(self.cfg, self.dtype, name="embeddings")(batch, train)
    x = Encoder(self.cfg, self.dtype, name="encoder")(x, mask, train)
    if not self.add_pooler:
      return x
    pooled = nn.tanh(Pooler(self.cfg, self.dtype, name="pooler")(x[:, 0]))
    return x, pooled


class Pooler(nn.Module):
  cfg: EncoderConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = self.cfg
    return layers.dense(c.hidden_size, name="dense", dtype=self.dtype, std=c.initializer_range)(x)


class RobertaHead(nn.Module):
  """RoBERTa's classifier: <s> state -> dropout -> dense -> tanh -> dropout -> out_proj."""

  cfg: EncoderConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxTxD, train: bool):
    c = self.cfg
    rate = c.hidden_dropout if c.classifier_dropout is None else c.classifier_dropout
    kw = dict(dtype=self.dtype, std=c.initializer_range)
    x = layers.dropout(rate, x_BxTxD[:, 0], self, train)
    x = nn.tanh(layers.dense(c.hidden_size, name="dense", **kw)(x))
    x = layers.dropout(rate, x, self, train)
    return layers.dense(c.num_labels, name="out_proj", **kw)(x)


class ForSequenceClassification(nn.Module):
  """BertForSequenceClassification / RobertaForSequenceClassification: logits (B, num_labels)."""

  cfg: EncoderConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, batch: dict, *, train: bool = False):
    c = self.cfg
    if c.roberta:
      x = BertModel(c, self.dtype, add_pooler=False, name="roberta")(batch, train=train)
      return RobertaHead(c, self.dtype, name="classifier")(x, train)
    _, pooled = BertModel(c, self.dtype, add_pooler=True, name="bert")(batch, train=train)
    rate = c.hidden_dropout if c.classifier_dropout is None else c.classifier_dropout
    pooled = layers.dropout(rate, pooled, self, train)
    return layers.dense(c.num_labels, name="classifier", dtype=self.dtype,
                        std=c.initializer_range)(pooled)


# ------------------------------------------------------------------------------------ family API

def build(hf_config_dict: Mapping[str, Any], task: str, *, dtype=jnp.float32,
          num_labels: Optional[int] = None, remat: bool = False,
          memory_lean: bool = True) -> nn.Module:
  """The Flax module for a BERT/RoBERTa config dict and task ('classification' | 'features').

  Args:
    memory_lean: the backend's fused attention (memory-lean custom VJP on CPU, cuDNN flash on
      GPU) and the custom-VJP exact GELU; False = plain XLA autodiff (config
      `model.fused_layers`). Same maths and params either way.

  Example:
    >>> model = build(read_config(path), "features")
    >>> hidden = model.apply({"params": params}, {"input_ids": ids})      # (B, T, d)
  """
  cfg = dataclasses.replace(EncoderConfig.from_hf(hf_config_dict, num_labels, remat),
                            memory_lean=bool(memory_lean))
  if task == "classification":
    return ForSequenceClassification(cfg, dtype)
  if task == "features":
    return BertModel(cfg, dtype, add_pooler=False)
  raise ValueError(f"BERT/RoBERTa support tasks {', '.join(TASKS)}; got {task!r}.")


def prefix(hf_config_dict: Mapping[str, Any]) -> str:
  """transformers' base_model_prefix: 'bert' or 'roberta' (for hf_io.to_flax(prefix=...))."""
  return "roberta" if hf_config_dict.get("model_type") == "roberta" else "bert"


def tied_params(hf_config_dict: Mapping[str, Any], task: str) -> tuple[tuple[str, str], ...]:
  """No tied params in these tasks."""
  del hf_config_dict, task
  return ()


def head_regex(task: str) -> str:
  """Regex of the params a fresh task head creates ('' for none)."""
  return r"classifier/.*" if task == "classification" else ""


def dummy_batch(hf_config_dict: Mapping[str, Any], batch: int = 1, seq: int = 8) -> dict:
  """Inputs of the right shapes and dtypes for `module.init` / `jax.eval_shape`."""
  del hf_config_dict
  ids = np.full((batch, seq), 5, np.int32)
  return {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
