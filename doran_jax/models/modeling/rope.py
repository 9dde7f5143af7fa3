"""Rotary position embeddings (RoPE) and the rope-scaling types of Hugging Face checkpoints.

The inverse frequencies and the attention scaling (YaRN's mscale) follow transformers'
`modeling_rope_utils` for `default`, `linear`, `dynamic` (NTK-aware), `llama3` and `yarn`, in
float32 as it computes them, so a checkpoint's cos/sin tables agree with PyTorch's to float
rounding. The rotation is the rotate-half convention of the HF checkpoints: the head vector is
split into halves (x1, x2) and rotated as (x1·cos − x2·sin, x2·cos + x1·sin), with frequency i
used at both i and i + D/2. With `partial_rotary_factor` < 1 only the first `rotary_dim` channels
rotate and the rest pass through.

Config dicts come in two dialects and both are read:
  transformers 4.x: `rope_theta` at the top level, `rope_scaling` = {'rope_type' (or the legacy
    'type'), 'factor', ...} or null;
  transformers 5.x: `rope_parameters` = {'rope_type', 'rope_theta', 'factor', ...}, or for hybrid
    models (Gemma 3) one such dict per layer type ({'full_attention': {...}, ...}).

Example:
  >>> rp = rope_parameters(cfg)                        # normalised {'rope_type', 'rope_theta', ...}
  >>> inv_freq_F, scale = inv_freq(cfg, rp)
  >>> q_BxTxHxD = apply_rotary(q_BxTxHxD, positions_BxT, inv_freq_F, scale)
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional

import jax.numpy as jnp
import numpy as np

from doran_jax.errors import ConfigError

ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")
LAYER_TYPES = ("full_attention", "sliding_attention")


def head_dim(cfg: Mapping[str, Any]) -> int:
  """The per-head size: `head_dim` when the config sets it, else hidden_size // heads."""
  return int(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])


def rope_parameters(cfg: Mapping[str, Any], layer_type: Optional[str] = None) -> dict:
  """The rope settings of one layer type as one flat dict, from either config dialect.

  Args:
    cfg: a transformers config as a dict (`config.json` or `config.to_dict()`).
    layer_type: 'full_attention' or 'sliding_attention' for hybrid models; None otherwise.
      Gemma 3's local (sliding) layers use `rope_local_base_freq` and no scaling (4.x dialect).

  Returns:
    {'rope_type': one of ROPE_TYPES, 'rope_theta': float, 'partial_rotary_factor': float, plus
    the type's own keys ('factor', 'low_freq_factor', 'beta_fast', ...)}.

  Example:
    >>> rope_parameters({"rope_theta": 5e5, "rope_scaling": {"type": "linear", "factor": 2.0}})
    {'rope_type': 'linear', 'factor': 2.0, 'rope_theta': 500000.0, 'partial_rotary_factor': 1.0}
  """
  params = cfg.get("rope_parameters")
  if isinstance(params, Mapping) and any(k in params for k in LAYER_TYPES):
    # 5.x hybrid models: one dict per layer type.
    params = params.get(layer_type or "full_attention")
  if isinstance(params, Mapping):
    out = dict(params)
    out.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
  else:
    scaling = cfg.get("rope_scaling")
    if layer_type == "sliding_attention" and "rope_local_base_freq" in cfg:
      # Gemma 3 (4.x): local layers use their own base and never scale.
      out = {"rope_type": "default", "rope_theta": cfg["rope_local_base_freq"]}
    else:
      out = dict(scaling) if isinstance(scaling, Mapping) else {}
      out["rope_theta"] = cfg.get("rope_theta", 10000.0)
  rope_type = out.pop("rope_type", None) or out.pop("type", None) or "default"
  out.pop("type", None)
  if rope_type not in ROPE_TYPES:
    raise ConfigError(f"rope type {rope_type!r} is not supported; supported: "
                      f"{', '.join(ROPE_TYPES)}.")
  out = {"rope_type": rope_type, **out}
  out["rope_theta"] = float(out["rope_theta"])
  out.setdefault("partial_rotary_factor", float(cfg.get("partial_rotary_factor", 1.0) or 1.0))
  return out


def rotary_dim(cfg: Mapping[str, Any], rope: Mapping[str, Any]) -> int:
  """How many channels of each head rotate (all, unless `partial_rotary_factor` < 1)."""
  return int(head_dim(cfg) * rope.get("partial_rotary_factor", 1.0))


def _default_inv_freq(base, dim: int) -> np.ndarray:
  # float32 exponents and a float32 power, as transformers computes them.
  exponent_F = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
  return (np.float32(1.0) / np.power(np.float32(base), exponent_F)).astype(np.float32)


def _llama3_inv_freq(inv_freq_F: np.ndarray, rope: Mapping[str, Any]) -> np.ndarray:
  factor = rope["factor"]
  low, high = rope["low_freq_factor"], rope["high_freq_factor"]
  old_context = rope["original_max_position_embeddings"]
  wavelen_F = np.float32(2 * math.pi) / inv_freq_F
  # Long wavelengths (low frequencies) are divided by `factor`, short ones kept, the band in
  # between interpolated smoothly in 1/wavelength.
  scaled_F = np.where(wavelen_F > old_context / low, inv_freq_F / np.float32(factor), inv_freq_F)
  smooth_F = (np.float32(old_context) / wavelen_F - np.float32(low)) / np.float32(high - low)
  smoothed_F = (1 - smooth_F) * scaled_F / np.float32(factor) + smooth_F * scaled_F
  medium = ~(wavelen_F < old_context / high) & ~(wavelen_F > old_context / low)
  return np.where(medium, smoothed_F, scaled_F).astype(np.float32)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
  return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(cfg: Mapping[str, Any], rope: Mapping[str, Any], dim: int) -> tuple[np.ndarray, float]:
  base, factor = rope["rope_theta"], rope["factor"]
  # transformers 4.57 uses the explicit `factor` even when it disagrees with
  # max_position_embeddings / original_max_position_embeddings (some other versions use the
  # ratio); consistent configs give the same either way.
  original = rope.get("original_max_position_embeddings") or cfg["max_position_embeddings"]
  attention = rope.get("attention_factor")
  if attention is None:
    mscale, mscale_all_dim = rope.get("mscale"), rope.get("mscale_all_dim")
    if mscale and mscale_all_dim:
      attention = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
    else:
      attention = _yarn_mscale(factor)
  beta_fast = rope.get("beta_fast") or 32
  beta_slow = rope.get("beta_slow") or 1

  def correction_dim(rotations):
    # The channel whose wavelength completes `rotations` turns over the original context.
    return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

  low, high = correction_dim(beta_fast), correction_dim(beta_slow)
  if rope.get("truncate", True):
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, dim - 1)
  if low == high:
    high += 0.001  # avoids a zero-width ramp

  pos_freqs_F = np.power(np.float32(base),
                         np.arange(0, dim, 2).astype(np.float32) / np.float32(dim))
  extrapolation_F = np.float32(1.0) / pos_freqs_F
  interpolation_F = np.float32(1.0) / (np.float32(factor) * pos_freqs_F)
  ramp_F = np.clip((np.arange(dim // 2, dtype=np.float32) - np.float32(low))
                   / np.float32(high - low), 0, 1)
  # High-frequency channels (below `low`) extrapolate, low-frequency ones interpolate.
  keep_F = (1 - ramp_F).astype(np.float32)
  inv_freq_F = interpolation_F * (1 - keep_F) + extrapolation_F * keep_F
  return inv_freq_F.astype(np.float32), float(attention)


def inv_freq(cfg: Mapping[str, Any], rope: Mapping[str, Any], seq_len: Any = None):
  """Inverse frequencies (rotary_dim // 2,) float32 and the cos/sin scaling of one rope type.

  Args:
    cfg: the model config dict (max_position_embeddings, head_dim or hidden_size/heads).
    rope: `rope_parameters(cfg, ...)`.
    seq_len: only for 'dynamic': the sequence length the batch reaches, max(position_ids) + 1
      (a Python int or a traced scalar). The base grows once it passes max_position_embeddings,
      as a freshly loaded transformers model computes it for that batch.

  Returns:
    (inv_freq_F, attention_scaling): a numpy array, or a jnp array for 'dynamic' with a
    seq_len; a Python float (1.0 except for YaRN).

  Example:
    >>> inv_freq_F, scale = inv_freq(cfg, rope_parameters(cfg))
  """
  kind, base = rope["rope_type"], rope["rope_theta"]
  dim = rotary_dim(cfg, rope)
  if kind == "default":
    return _default_inv_freq(base, dim), 1.0
  if kind == "linear":
    # Dividing the frequencies equals dividing the positions by `factor`.
    return (_default_inv_freq(base, dim) / np.float32(rope["factor"])).astype(np.float32), 1.0
  if kind == "llama3":
    return _llama3_inv_freq(_default_inv_freq(base, dim), rope), 1.0
  if kind == "yarn":
    return _yarn(cfg, rope, dim)
  if kind == "dynamic":
    if seq_len is None:
      return _default_inv_freq(base, dim), 1.0
    max_pos = cfg["max_position_embeddings"]
    factor = jnp.float32(rope["factor"])
    seq = jnp.maximum(jnp.asarray(seq_len, jnp.int32), max_pos).astype(jnp.float32)
    # NTK-aware: a larger base stretches low frequencies more than high ones; float32 as torch.
    grown = jnp.float32(base) * ((factor * seq / max_pos) - (factor - 1)) ** (dim / (dim - 2))
    exponent_F = jnp.arange(0, dim, 2, dtype=jnp.float32) / jnp.float32(dim)
    dynamic_F = 1.0 / grown ** exponent_F
    # Within the original context transformers keeps the unscaled table.
    return jnp.where(jnp.asarray(seq_len) > max_pos, dynamic_F,
                     jnp.asarray(_default_inv_freq(base, dim))), 1.0
  raise ConfigError(f"rope type {kind!r} is not supported; supported: {', '.join(ROPE_TYPES)}.")


def cos_sin(positions_BxT, inv_freq_F, attention_scaling: float = 1.0, dtype=jnp.float32):
  """cos and sin tables (B, T, 2F) in float32 (cast to `dtype`), each frequency used twice.

  Example:
    >>> cos_BxTxR, sin_BxTxR = cos_sin(jnp.arange(8)[None], inv_freq_F)
  """
  angle_BxTxF = positions_BxT.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq_F,
                                                                           jnp.float32)
  angle_BxTxR = jnp.concatenate([angle_BxTxF, angle_BxTxF], axis=-1)
  cos_BxTxR = jnp.cos(angle_BxTxR) * attention_scaling
  sin_BxTxR = jnp.sin(angle_BxTxR) * attention_scaling
  return cos_BxTxR.astype(dtype), sin_BxTxR.astype(dtype)


def rotate(x_BxTxHxD, cos_BxTxR, sin_BxTxR):
  """Applies precomputed cos/sin tables (from `cos_sin`) to every head of x.

  Example:
    >>> q_BxTxHxD = rotate(q_BxTxHxD, *cos_sin(positions_BxT, inv_freq_F))
  """
  rot = cos_BxTxR.shape[-1]
  x_rot, x_pass = x_BxTxHxD[..., :rot], x_BxTxHxD[..., rot:]
  cos_BxTx1xR, sin_BxTx1xR = cos_BxTxR[:, :, None, :], sin_BxTxR[:, :, None, :]
  x1, x2 = x_rot[..., : rot // 2], x_rot[..., rot // 2:]
  rotated_half = jnp.concatenate([-x2, x1], axis=-1)
  out = x_rot * cos_BxTx1xR + rotated_half * sin_BxTx1xR
  if x_pass.shape[-1]:
    out = jnp.concatenate([out, x_pass], axis=-1)
  return out


def apply_rotary(x_BxTxHxD, positions_BxT, inv_freq_F, attention_scaling: float = 1.0):
  """Rotates x by its positions, rotate-half convention, in x's dtype (tables cast to it).

  Args:
    x_BxTxHxD: queries or keys.
    positions_BxT: integer positions.
    inv_freq_F: (rotary_dim // 2,) from `inv_freq`; channels past rotary_dim pass through.
    attention_scaling: multiplies cos and sin (YaRN's mscale; 1 otherwise).

  Example:
    >>> k_BxTxKxD = apply_rotary(k_BxTxKxD, jnp.arange(T)[None], *inv_freq(cfg, rope))
  """
  cos_BxTxR, sin_BxTxR = cos_sin(positions_BxT, inv_freq_F, attention_scaling, x_BxTxHxD.dtype)
  return rotate(x_BxTxHxD, cos_BxTxR, sin_BxTxR)
