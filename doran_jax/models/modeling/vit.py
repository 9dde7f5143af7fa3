"""ViT (pre-LN encoder over image patches) for image classification and features.

Param paths are transformers' PyTorch names with '.' -> '/':
  image_classification  vit/embeddings/cls_token (1, 1, d), vit/embeddings/position_embeddings
                        (1, N + 1, d), vit/embeddings/patch_embeddings/projection/kernel (conv,
                        (p, p, C, d)), vit/encoder/layer/0/attention/attention/query/kernel,
                        vit/layernorm/scale, classifier/kernel   (ViTForImageClassification)
  features              the bare ViTModel's names without the prefix (embeddings/..., encoder/...,
                        layernorm/...); its pooler is not built.

Input `pixel_values` (B, C, H, W) float, H and W the config's image_size (no position
interpolation).

Example:
  >>> model = build(read_config(path), "image_classification", num_labels=10)
  >>> logits = model.apply({"params": params}, {"pixel_values": images})     # (B, 10)
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

MODEL_TYPES = ("vit",)
TASKS = ("image_classification", "features")
NO_TRANSPOSE = r""
RENAMES = ()


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """The fields of a transformers ViTConfig the model reads."""

  hidden_size: int
  num_layers: int
  num_heads: int
  intermediate_size: int
  image_size: int
  patch_size: int
  num_channels: int = 3
  hidden_act: str = "gelu"
  layer_norm_eps: float = 1e-12
  hidden_dropout: float = 0.0
  attention_dropout: float = 0.0
  qkv_bias: bool = True
  initializer_range: float = 0.02
  num_labels: int = 2
  remat: bool = False
  memory_lean: bool = True   # fused attention and GELU (layers.attention_implementation)

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  @classmethod
  def from_hf(cls, d: Mapping[str, Any], num_labels: Optional[int] = None,
              remat: bool = False) -> "ViTConfig":
    if d.get("model_type") not in MODEL_TYPES:
      raise ValueError(f"vit.py reads model_type 'vit'; got {d.get('model_type')!r}.")
    size, patch = d.get("image_size", 224), d.get("patch_size", 16)
    if isinstance(size, (list, tuple)) or isinstance(patch, (list, tuple)):
      raise ConfigError(f"only square images and patches are supported; got image_size {size}, "
                        f"patch_size {patch}.")
    return cls(
        hidden_size=d["hidden_size"], num_layers=d["num_hidden_layers"],
        num_heads=d["num_attention_heads"], intermediate_size=d["intermediate_size"],
        image_size=size, patch_size=patch, num_channels=d.get("num_channels", 3),
        hidden_act=d.get("hidden_act", "gelu"), layer_norm_eps=d.get("layer_norm_eps", 1e-12),
        hidden_dropout=d.get("hidden_dropout_prob", 0.0),
        attention_dropout=d.get("attention_probs_dropout_prob", 0.0),
        qkv_bias=d.get("qkv_bias", True), initializer_range=d.get("initializer_range", 0.02),
        num_labels=num_labels_of(d, num_labels), remat=remat)


class PatchEmbeddings(nn.Module):
  cfg: ViTConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, pixels_BxCxHxW):
    c = self.cfg
    if pixels_BxCxHxW.shape[1:] != (c.num_channels, c.image_size, c.image_size):
      raise ValueError(f"pixel_values must be (B, {c.num_channels}, {c.image_size}, "
                       f"{c.image_size}); got {pixels_BxCxHxW.shape}.")
    x_BxHxWxC = jnp.transpose(jnp.asarray(pixels_BxCxHxW, self.dtype), (0, 2, 3, 1))
    p = c.patch_size
    x = nn.Conv(c.hidden_size, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                kernel_init=layers.normal_init(c.initializer_range), name="projection")(x_BxHxWxC)
    # Row-major over the patch grid, as torch's flatten(2).transpose(1, 2).
    return x.reshape(x.shape[0], -1, c.hidden_size)


class Embeddings(nn.Module):
  cfg: ViTConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, pixels, train: bool):
    c = self.cfg
    init = layers.normal_init(c.initializer_range)
    cls = self.param("cls_token", init, (1, 1, c.hidden_size), jnp.float32)
    pos = self.param("position_embeddings", init, (1, c.num_patches + 1, c.hidden_size), jnp.float32)
    x = PatchEmbeddings(c, self.dtype, name="patch_embeddings")(pixels)
    cls = jnp.broadcast_to(jnp.asarray(cls, self.dtype), (x.shape[0], 1, c.hidden_size))
    x = jnp.concatenate([cls, x], axis=1) + jnp.asarray(pos, self.dtype)
    return layers.dropout(c.hidden_dropout, x, self, train)


class SelfAttention(nn.Module):
  cfg: ViTConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxTxD, train: bool):
    c = self.cfg
    b, t, _ = x_BxTxD.shape
    head = c.hidden_size // c.num_heads
    kw = dict(dtype=self.dtype, std=c.initializer_range, use_bias=c.qkv_bias)
    q, k, v = (layers.dense(c.hidden_size, name=n, **kw)(x_BxTxD).reshape(b, t, c.num_heads, head)
               for n in ("query", "key", "value"))
    rate = c.attention_dropout if train else 0.0
    out = layers.dot_product_attention(
        q, k, v, dropout_rate=rate, dropout_rng=self.make_rng("dropout") if rate > 0 else None,
        implementation=layers.attention_implementation(c.memory_lean))
    return out.reshape(b, t, c.hidden_size)


class DenseDropout(nn.Module):
  """dense -> dropout (ViT's SelfOutput; Output adds the residual outside)."""

  features: int
  cfg: ViTConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    x = layers.dense(self.features, name="dense", dtype=self.dtype, std=self.cfg.initializer_range)(x)
    return layers.dropout(self.cfg.hidden_dropout, x, self, train)


class Attention(nn.Module):
  cfg: ViTConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    a = SelfAttention(self.cfg, self.dtype, name="attention")(x, train)
    return DenseDropout(self.cfg.hidden_size, self.cfg, self.dtype, name="output")(a, train)


class Intermediate(nn.Module):
  cfg: ViTConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = self.cfg
    x = layers.dense(c.intermediate_size, name="dense", dtype=self.dtype, std=c.initializer_range)(x)
    return layers.activation(c.hidden_act, c.memory_lean)(x)


class Layer(nn.Module):
  cfg: ViTConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    c = self.cfg
    ln = lambda name: layers.layer_norm(c.layer_norm_eps, name=name, dtype=self.dtype)
    x = x + Attention(c, self.dtype, name="attention")(ln("layernorm_before")(x), train)
    h = Intermediate(c, self.dtype, name="intermediate")(ln("layernorm_after")(x))
    return x + DenseDropout(c.hidden_size, c, self.dtype, name="output")(h, train)


class LayerStack(nn.Module):
  cfg: ViTConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    # `train` (arg 2 counting self) is static under remat: it switches dropout.
    block = nn.remat(Layer, static_argnums=(2,)) if self.cfg.remat else Layer
    for i in range(self.cfg.num_layers):
      x = block(self.cfg, self.dtype, name=str(i))(x, train)
    return x


class Encoder(nn.Module):
  cfg: ViTConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    return LayerStack(self.cfg, self.dtype, name="layer")(x, train)


class ViTModel(nn.Module):
  """The bare ViT: the last hidden state (B, N + 1, d) after the final LayerNorm."""

  cfg: ViTConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, batch: dict, *, train: bool = False):
    c = self.cfg
    x = Embeddings(c, self.dtype, name="embeddings")(batch["pixel_values"], train)
    x = Encoder(c, self.dtype, name="encoder")(x, train)
    return layers.layer_norm(c.layer_norm_eps, name="layernorm", dtype=self.dtype)(x)


class ForImageClassification(nn.Module):
  """ViTForImageClassification: `classifier` on the [CLS] state, logits (B, num_labels)."""

  cfg: ViTConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, batch: dict, *, train: bool = False):
    x = ViTModel(self.cfg, self.dtype, name="vit")(batch, train=train)
    return layers.dense(self.cfg.num_labels, name="classifier", dtype=self.dtype,
                        std=self.cfg.initializer_range)(x[:, 0])


# ------------------------------------------------------------------------------------ family API

def build(hf_config_dict: Mapping[str, Any], task: str, *, dtype=jnp.float32,
          num_labels: Optional[int] = None, remat: bool = False,
          memory_lean: bool = True) -> nn.Module:
  """The Flax module for a ViT config dict and task ('image_classification' | 'features').

  Args:
    memory_lean: the backend's fused attention (memory-lean custom VJP on CPU, cuDNN flash on
      GPU) and the custom-VJP exact GELU; False = plain XLA autodiff (config
      `model.fused_layers`). Same maths and params either way.

  Example:
    >>> model = build(read_config(path), "image_classification", num_labels=10)
  """
  cfg = dataclasses.replace(ViTConfig.from_hf(hf_config_dict, num_labels, remat),
                            memory_lean=bool(memory_lean))
  if task == "image_classification":
    return ForImageClassification(cfg, dtype)
  if task == "features":
    return ViTModel(cfg, dtype)
  raise ValueError(f"ViT supports tasks {', '.join(TASKS)}; got {task!r}.")


def prefix(hf_config_dict: Mapping[str, Any]) -> str:
  """transformers' base_model_prefix (for hf_io.to_flax(prefix=...))."""
  del hf_config_dict
  return "vit"


def tied_params(hf_config_dict: Mapping[str, Any], task: str) -> tuple[tuple[str, str], ...]:
  """No tied params."""
  del hf_config_dict, task
  return ()


def head_regex(task: str) -> str:
  """Regex of the params a fresh task head creates ('' for none)."""
  return r"classifier/.*" if task == "image_classification" else ""


def dummy_batch(hf_config_dict: Mapping[str, Any], batch: int = 1, seq: int = 0) -> dict:
  """Inputs of the right shapes and dtypes for `module.init` / `jax.eval_shape` (`seq` unused)."""
  del seq
  c = ViTConfig.from_hf(hf_config_dict)
  return {"pixel_values": np.zeros((batch, c.num_channels, c.image_size, c.image_size), np.float32)}
