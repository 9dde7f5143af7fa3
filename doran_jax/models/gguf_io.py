"""GGUF files (llama.cpp's format) to a transformers config dict and torch-named tensors, no torch.

A GGUF holds its config as metadata under llama.cpp's key names and its tensors under llama.cpp's
names, most of them block-quantised. `open_gguf` reads the metadata and the tensor table (not the
data) with `gguf.GGUFReader`, checks them against each other and against the file's size, and
gives:

  config        the transformers config dict the metadata describes (model_type llama, mistral,
                qwen2, qwen3 or gemma3_text), as `hf_io.read_config` gives for a folder;
  lazy_state()  {transformers' torch name: zero-argument reader -> float host array, torch layout
                (out, in)}, as `hf_io.lazy_state` gives: each tensor is dequantised on the host
                (every type `gguf.quants.dequantize` knows) only when its reader is called.

so `hf_io.to_flax` maps a GGUF exactly as it maps a safetensors folder. Two of llama.cpp's
conversions are undone on read, as transformers' GGUF loader undoes them: the converter reorders
the rows of q and k (and their biases) of Llama-architecture files for its rotary layout, and
stores Gemma's RMSNorm weights with the +1 of `x * (1 + w)` already added.

  llama.cpp                    transformers
  token_embd                   model.embed_tokens
  blk.N.attn_norm              model.layers.N.input_layernorm
  blk.N.attn_q / k / v         model.layers.N.self_attn.q_proj / k_proj / v_proj
  blk.N.attn_output            model.layers.N.self_attn.o_proj
  blk.N.attn_q_norm / k_norm   model.layers.N.self_attn.q_norm / k_norm      (Qwen3, Gemma 3)
  blk.N.ffn_norm               model.layers.N.post_attention_layernorm
                               (Gemma 3: model.layers.N.pre_feedforward_layernorm)
  blk.N.post_attention_norm    model.layers.N.post_attention_layernorm       (Gemma 3)
  blk.N.post_ffw_norm          model.layers.N.post_feedforward_layernorm     (Gemma 3)
  blk.N.ffn_gate / up / down   model.layers.N.mlp.gate_proj / up_proj / down_proj
  output_norm                  model.norm
  output                       lm_head (absent: tied to the embedding)

Example:
  >>> ckpt = open_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")
  >>> ckpt.config["model_type"], ckpt.config["num_hidden_layers"]
  ('llama', 30)
  >>> params, missing, unused = hf_io.to_flax(ckpt.lazy_state(), abstract, prefix="model")
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from typing import Any, Callable, Optional

import numpy as np

from doran_jax import paths
from doran_jax.errors import CheckpointError
from doran_jax.models import hf_io

SUFFIX = ".gguf"
# general.architecture -> transformers model_type (and the class transformers builds for it).
ARCHITECTURES = {"llama": ("llama", "LlamaForCausalLM"),
                 "mistral": ("mistral", "MistralForCausalLM"),
                 "qwen2": ("qwen2", "Qwen2ForCausalLM"),
                 "qwen3": ("qwen3", "Qwen3ForCausalLM"),
                 "gemma3": ("gemma3_text", "Gemma3ForCausalLM")}
# llama.cpp's converter permutes q/k rows only for its Llama-graph architectures; Qwen and Gemma
# files keep transformers' (rotate-half) row order.
_PERMUTED = ("llama", "mistral")
_GEMMA = ("gemma3",)
# llama.cpp's token types (tokenizer.ggml.token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Per-block tensors: llama.cpp name -> transformers module path under model.layers.N.
_BLOCK = {"attn_norm": "input_layernorm",
          "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
          "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
          "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
          "ffn_norm": "post_attention_layernorm",
          "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
_GEMMA_BLOCK = {**_BLOCK, "ffn_norm": "pre_feedforward_layernorm",
                "post_attention_norm": "post_attention_layernorm",
                "post_ffw_norm": "post_feedforward_layernorm"}
_GLOBAL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def is_gguf(path) -> bool:
  """Whether `path` names a GGUF file (by its suffix; the file itself is checked on open)."""
  return isinstance(path, (str, os.PathLike)) and os.fspath(path).lower().endswith(SUFFIX)


def remote_error(url: str) -> CheckpointError:
  """Why a GGUF file at a URL is not read: the gguf package maps the file into memory
  (np.memmap), which needs it on local disk, and copying gigabytes behind the user's back on
  every run of every host would be worse than saying so."""
  name = url.rstrip("/").rsplit("/", 1)[-1]
  return CheckpointError(
      f"GGUF file {url!r} is in remote storage; GGUF files are read from local disk (memory-"
      f"mapped). Copy it first (e.g. `gcloud storage cp {url} /tmp/{name}`) and pass "
      f"--config.model.name=/tmp/{name}, or convert the model to a safetensors folder, which "
      "is read from the bucket directly.")


def _float32(x) -> float:
  # Metadata floats are float32: keep the shortest decimal that reads back as the same float32
  # (1e-05, not 9.999999747378752e-06), which is what the source config.json said.
  return float(str(np.float32(x)))


def _supported_types() -> set:
  import gguf
  from gguf import quants
  # F32 and F16 are handled by dequantize itself; the rest by a registered block type.
  return ({gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16}
          | {t for t, cls in quants._type_traits.items()  # pylint: disable=protected-access
             if "dequantize_blocks" in vars(cls)})


def _dequantize(reader_tensor, dtype) -> np.ndarray:
  """The tensor as float32 (then `dtype`) in torch's layout: numpy shape = GGUF dims reversed."""
  from gguf import quants
  x = quants.dequantize(reader_tensor.data, reader_tensor.tensor_type)
  shape = tuple(int(d) for d in reversed(reader_tensor.shape.tolist()))
  x = np.asarray(x, np.float32).reshape(shape)
  return hf_io.cast(x, dtype)


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
  """Undoes llama.cpp's q/k row order: per head, rows (0, 2, 4, ..., 1, 3, ...) <- interleaved.

  llama.cpp's converter writes `w.reshape(n_head, 2, D/2, ...).swapaxes(1, 2)` (the rotate-half
  pairs (i, i + D/2) become adjacent rows); this is its inverse. Works for weights (out, in) and
  biases (out,).

  Example:
    >>> q_hf = unpermute_rows(q_gguf, n_head=9); k_hf = unpermute_rows(k_gguf, n_head=3)
  """
  rows = w.shape[0]
  if rows % (2 * n_head):
    raise CheckpointError(f"cannot undo llama.cpp's q/k row order: {rows} rows are not a "
                          f"multiple of 2 x {n_head} heads.")
  return (w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2)
          .reshape(w.shape))


@dataclasses.dataclass(frozen=True)
class GGUFCheckpoint:
  """An opened, checked GGUF file: its config, tensor table and metadata (data read lazily).

  Attributes:
    path: the file.
    architecture: general.architecture ('llama').
    config: the transformers config dict.
    tensors: {llama.cpp name: gguf ReaderTensor} (memory-mapped; nothing read yet).
    names: {llama.cpp name: transformers torch name}.
    reader: the gguf.GGUFReader (metadata fields).
  """

  path: str
  architecture: str
  config: dict
  tensors: dict
  names: dict
  reader: Any

  def value(self, key: str, default=None):
    """A metadata value (str, int, float, bool or list), or `default` when absent."""
    return _value(self.reader, key, default)

  def lazy_state(self, *, dtype=None) -> dict[str, Callable[[], np.ndarray]]:
    """{torch name: reader}; each reader dequantises one tensor on the host (torch layout,
    cast to `dtype` when given, else float32), with llama.cpp's q/k order and Gemma's +1 undone.

    Example:
      >>> x = ckpt.lazy_state()["model.layers.0.self_attn.q_proj.weight"]()   # (576, 576)
    """
    dtype = hf_io.as_numpy_dtype(dtype)
    cfg = self.config
    out = {}
    for name, hf_name in self.names.items():
      fix = None
      qk = re.fullmatch(r"blk\.\d+\.attn_[qk]\.(weight|bias)", name)
      if self.architecture in _PERMUTED and qk:
        heads = cfg["num_attention_heads"] if ".attn_q." in name else cfg["num_key_value_heads"]
        fix = functools.partial(unpermute_rows, n_head=int(heads))
      elif self.architecture in _GEMMA and name.endswith("norm.weight"):
        fix = _minus_one
      out[hf_name] = functools.partial(_read, self.tensors[name], fix, dtype)
    return out


def _minus_one(w):
  # llama.cpp stores Gemma's norm weight as 1 + w (its RMSNorm multiplies by the weight alone);
  # transformers' Gemma 3 (and ours) compute x * (1 + w).
  return w - np.float32(1.0)


def _read(reader_tensor, fix, dtype):
  x = _dequantize(reader_tensor, None)
  if fix is not None:
    x = fix(x)
  return hf_io.cast(np.ascontiguousarray(x), dtype)


def _value(reader, key: str, default=None):
  field = reader.fields.get(key)
  if field is None:
    return default
  try:
    return field.contents()
  except (UnicodeDecodeError, IndexError, ValueError) as e:
    raise CheckpointError(f"GGUF metadata {key!r} cannot be read ({type(e).__name__}: {e}); the "
                          "file is damaged.") from e


def _open_reader(path: str):
  import gguf
  try:
    return gguf.GGUFReader(path)
  except Exception as e:  # the reader fails deep inside on bad bytes; one clear message for all
    message = str(e)
    if "GGMLQuantizationType" in message:
      hint = (f"it holds a tensor type this gguf=={_gguf_version()} does not know ({message}); "
              "the file is damaged or newer than the reader")
    elif "reshape" in message or isinstance(e, IndexError):
      hint = f"its tensor table points past the end of the file ({message}): it is truncated"
    else:
      hint = f"{type(e).__name__}: {message}"
    raise CheckpointError(f"{path!r} is not a readable GGUF file: {hint}. Re-download or "
                          "re-convert it.") from e


def _gguf_version() -> str:
  from importlib import metadata
  try:
    return metadata.version("gguf")
  except metadata.PackageNotFoundError:
    return "?"


def open_gguf(path) -> GGUFCheckpoint:
  """Opens and checks a GGUF file: config from the metadata, tensor names, shapes and byte ranges.

  Raises CheckpointError naming the problem for a missing, truncated or damaged file, an
  unsupported architecture or tensor type, a missing, unexpected or misshapen tensor, and
  metadata that contradicts the tensors.

  Example:
    >>> ckpt = open_gguf(models.resolve("smollm2"))
    >>> ckpt.config["rope_theta"], ckpt.config["tie_word_embeddings"]
    (100000.0, True)
  """
  path = os.fspath(path)
  if paths.is_remote(path):
    raise remote_error(path)
  if not os.path.isfile(path):
    raise CheckpointError(f"GGUF file {path!r} does not exist.")
  size = os.path.getsize(path)
  reader = _open_reader(path)
  arch = _value(reader, "general.architecture")
  if arch not in ARCHITECTURES:
    raise CheckpointError(
        f"{path!r}: GGUF architecture {arch!r} is not supported; supported: "
        f"{', '.join(sorted(ARCHITECTURES))}. (A new architecture needs its config keys and "
        "tensor names in doran_jax/models/gguf_io.py and a family in doran_jax/models/.)")
  tensors = {}
  supported = _supported_types()
  for t in reader.tensors:
    if t.tensor_type not in supported:
      raise CheckpointError(
          f"{path!r}: tensor {t.name!r} has type {t.tensor_type.name}, which gguf cannot "
          f"dequantise; supported: {', '.join(sorted(x.name for x in supported))}.")
    if t.data_offset + t.n_bytes > size or t.data.nbytes != t.n_bytes:
      raise CheckpointError(
          f"{path!r}: tensor {t.name!r} spans bytes {t.data_offset}..{t.data_offset + t.n_bytes} "
          f"but the file has {size}: it is truncated. Re-download it.")
    tensors[t.name] = t
  config = _config(reader, arch, tensors, path)
  names = _check_tensors(arch, config, tensors, path)
  return GGUFCheckpoint(path=path, architecture=arch, config=config, tensors=tensors, names=names,
                        reader=reader)


def _config(reader, arch: str, tensors: dict, path: str) -> dict:
  """The transformers config dict of the metadata (keys transformers' GGUF loader sets, plus
  the family switches our decoder and transformers' class read)."""

  def need(key, default=None):
    value = _value(reader, f"{arch}.{key}", default)
    if value is None:
      raise CheckpointError(f"{path!r}: GGUF metadata {arch}.{key} is missing; the file is "
                            "incomplete.")
    if isinstance(value, (list, str, bool)):
      # Per-layer lists (OpenELM-style) do not fit our decoders: every layer has one shape.
      raise CheckpointError(f"{path!r}: GGUF metadata {arch}.{key} = {str(value)[:80]} is not "
                            "one number; per-layer values are not supported.")
    return value

  model_type, class_name = ARCHITECTURES[arch]
  heads = int(need("attention.head_count"))
  kv_heads = need("attention.head_count_kv", heads)
  hidden = int(need("embedding_length"))
  head_dim = need("attention.key_length", hidden // heads)
  tokens = reader.fields.get("tokenizer.ggml.tokens")
  vocab = _value(reader, f"{arch}.vocab_size")
  if vocab is None and tokens is not None:
    vocab = len(tokens.data)
  if vocab is None and "token_embd.weight" in tensors:
    vocab = int(tensors["token_embd.weight"].shape[1])
  if tokens is not None and vocab is not None and len(tokens.data) != int(vocab):
    # llama.cpp pads the token list to the embedding's rows; a mismatch would hand the model ids
    # it has no row for (or a vocabulary it cannot emit).
    raise CheckpointError(f"{path!r}: tokenizer.ggml.tokens lists {len(tokens.data)} tokens but "
                          f"the model's vocabulary ({arch}.vocab_size) is {vocab}.")
  cfg = {
      "model_type": model_type,
      "architectures": [class_name],
      "vocab_size": int(vocab) if vocab is not None else None,
      "hidden_size": hidden,
      "intermediate_size": int(need("feed_forward_length")),
      "num_hidden_layers": int(need("block_count")),
      "num_attention_heads": heads,
      "num_key_value_heads": int(kv_heads),
      "head_dim": int(head_dim),
      "max_position_embeddings": int(need("context_length")),
      "rms_norm_eps": _float32(need("attention.layer_norm_rms_epsilon")),
      "rope_theta": _float32(need("rope.freq_base", 10000.0)),
      # llama.cpp writes `output` only when the model does not reuse the embedding.
      "tie_word_embeddings": "output.weight" not in tensors,
  }
  for key, meta in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                    ("pad_token_id", "padding_token_id")):
    value = _value(reader, f"tokenizer.ggml.{meta}")
    if value is not None:
      cfg[key] = int(value)
  rope_dims = _value(reader, f"{arch}.rope.dimension_count")
  if rope_dims is not None and int(rope_dims) != cfg["head_dim"]:
    raise CheckpointError(
        f"{path!r}: {arch}.rope.dimension_count = {rope_dims} but the heads are {cfg['head_dim']} "
        "wide; partial rotary embeddings are not supported for this architecture.")
  scaling = _rope_scaling(reader, arch, path)
  if scaling:
    cfg["rope_scaling"] = scaling
  if "rope_freqs.weight" in tensors:
    if scaling:
      raise CheckpointError(f"{path!r} has both {arch}.rope.scaling.type and a rope_freqs tensor; "
                            "they contradict each other.")
    cfg["rope_scaling"] = _llama3_scaling(tensors["rope_freqs.weight"], cfg, path)
  if arch in ("llama", "mistral"):
    cfg["attention_bias"] = "blk.0.attn_q.bias" in tensors
    cfg["mlp_bias"] = "blk.0.ffn_gate.bias" in tensors
  window = _value(reader, f"{arch}.attention.sliding_window")
  if arch == "mistral":
    cfg["sliding_window"] = int(window) if window else None
  if arch in ("qwen2", "qwen3"):
    cfg["use_sliding_window"] = False
  if arch == "gemma3":
    cfg.update({
        "hidden_activation": "gelu_pytorch_tanh",
        "sliding_window": int(window) if window else 4096,
        # llama.cpp's Gemma 3 graph: every 6th layer global, local layers at base 10000.
        "sliding_window_pattern": 6,
        "layer_types": ["sliding_attention" if (i + 1) % 6 else "full_attention"
                        for i in range(cfg["num_hidden_layers"])],
        "rope_local_base_freq": 10000.0,
        # llama.cpp scales scores by head_dim^-0.5 (hidden/heads for the 62-layer 27B), which is
        # transformers' query_pre_attn_scalar of the released checkpoints.
        "query_pre_attn_scalar": hidden // heads if cfg["num_hidden_layers"] == 62 else head_dim,
        "final_logit_softcapping": _value(reader, f"{arch}.final_logit_softcapping"),
    })
  return cfg


def _rope_scaling(reader, arch: str, path: str) -> Optional[dict]:
  kind = _value(reader, f"{arch}.rope.scaling.type")
  if kind in (None, "none"):
    return None
  factor = _value(reader, f"{arch}.rope.scaling.factor")
  if kind == "linear":
    return {"rope_type": "linear", "factor": _float32(factor)}
  if kind == "yarn":
    out = {"rope_type": "yarn", "factor": _float32(factor)}
    original = _value(reader, f"{arch}.rope.scaling.original_context_length")
    if original is not None:
      out["original_max_position_embeddings"] = int(original)
    for key in ("beta_fast", "beta_slow"):
      value = _value(reader, f"{arch}.rope.scaling.yarn_{key}")
      if value is not None:
        out[key] = _float32(value)
    return out
  raise CheckpointError(f"{path!r}: rope scaling type {kind!r} is not supported; supported: "
                        "none, linear, yarn.")


# (low_freq_factor, high_freq_factor, original_max_position_embeddings) of the released
# Llama 3.1-3.3 configs: llama.cpp keeps only the per-frequency factors they produce.
_LLAMA3_SETTINGS = ((1.0, 4.0, 8192),)


def _llama3_scaling(reader_tensor, cfg: dict, path: str) -> dict:
  """Llama 3's rope scaling recovered from llama.cpp's rope_freqs tensor (inv_freq divisors).

  llama.cpp's converter writes, per frequency, default_inv_freq / llama3_inv_freq instead of the
  config's rope_scaling; the largest divisor is `factor`, and the band between 1 and `factor` fixes
  the other three values, which are checked against the released Llama 3 settings.
  """
  from doran_jax.models.modeling import rope as rope_lib
  hd, theta = cfg["head_dim"], cfg["rope_theta"]
  factors_F = _dequantize(reader_tensor, None).astype(np.float64).reshape(-1)
  if factors_F.shape != (hd // 2,):
    raise CheckpointError(f"{path!r}: rope_freqs has {factors_F.size} values but the heads rotate "
                          f"{hd // 2} frequencies.")
  rope_cfg = {"head_dim": hd, "hidden_size": cfg["hidden_size"],
              "num_attention_heads": cfg["num_attention_heads"],
              "max_position_embeddings": cfg["max_position_embeddings"]}
  base_F, _ = rope_lib.inv_freq(rope_cfg, {"rope_type": "default", "rope_theta": theta})
  factor = _float32(factors_F.max())
  for low, high, original in _LLAMA3_SETTINGS:
    params = {"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
              "high_freq_factor": high, "original_max_position_embeddings": original}
    scaled_F, _ = rope_lib.inv_freq(rope_cfg, {**params, "rope_theta": theta})
    if np.allclose(base_F / scaled_F, factors_F, rtol=1e-4, atol=0):
      return params
  raise CheckpointError(
      f"{path!r}: its rope_freqs tensor (per-frequency rope factors up to {factor}) matches no "
      "Llama 3 rope scaling we know (low/high frequency factors 1/4, original context 8192); "
      "load the original safetensors folder instead.")


def expected_shapes(arch: str, cfg: dict) -> dict[str, tuple[int, ...]]:
  """{llama.cpp tensor name: torch-layout shape} that a file of this config must hold.

  Example:
    >>> expected_shapes("llama", cfg)["blk.0.attn_k.weight"]
    (192, 576)
  """
  d, v, f = cfg["hidden_size"], cfg["vocab_size"], cfg["intermediate_size"]
  hd, h, k = cfg["head_dim"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
  out = {"token_embd.weight": (v, d), "output_norm.weight": (d,)}
  if not cfg["tie_word_embeddings"]:
    out["output.weight"] = (v, d)
  qkv_bias = arch == "qwen2" or cfg.get("attention_bias", False)
  for i in range(cfg["num_hidden_layers"]):
    b = f"blk.{i}."
    layer = {"attn_norm.weight": (d,), "attn_q.weight": (h * hd, d), "attn_k.weight": (k * hd, d),
             "attn_v.weight": (k * hd, d), "attn_output.weight": (d, h * hd),
             "ffn_norm.weight": (d,), "ffn_gate.weight": (f, d), "ffn_up.weight": (f, d),
             "ffn_down.weight": (d, f)}
    if qkv_bias:
      layer.update({"attn_q.bias": (h * hd,), "attn_k.bias": (k * hd,), "attn_v.bias": (k * hd,)})
    if cfg.get("attention_bias", False) and arch != "qwen2":
      layer["attn_output.bias"] = (d,)
    if cfg.get("mlp_bias", False):
      layer.update({"ffn_gate.bias": (f,), "ffn_up.bias": (f,), "ffn_down.bias": (d,)})
    if arch in ("qwen3", "gemma3"):
      layer.update({"attn_q_norm.weight": (hd,), "attn_k_norm.weight": (hd,)})
    if arch in _GEMMA:
      layer.update({"post_attention_norm.weight": (d,), "post_ffw_norm.weight": (d,)})
    out.update({b + name: shape for name, shape in layer.items()})
  return out


def torch_name(arch: str, name: str) -> Optional[str]:
  """A llama.cpp tensor name -> transformers' torch name (None if the name is not one we map).

  Example:
    >>> torch_name("llama", "blk.3.ffn_down.weight")
    'model.layers.3.mlp.down_proj.weight'
  """
  m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name)
  if m:
    table = _GEMMA_BLOCK if arch in _GEMMA else _BLOCK
    module = table.get(m.group(2))
    return f"model.layers.{m.group(1)}.{module}.{m.group(3)}" if module else None
  m = re.fullmatch(r"(\w+)\.(weight|bias)", name)
  if m and m.group(1) in _GLOBAL:
    return f"{_GLOBAL[m.group(1)]}.{m.group(2)}"
  return None


def _check_tensors(arch: str, cfg: dict, tensors: dict, path: str) -> dict[str, str]:
  """Every tensor the config implies is there with its shape, and nothing else is."""
  want = expected_shapes(arch, cfg)
  # Read into the config (rope scaling), not a parameter.
  tensors = {k: v for k, v in tensors.items() if k != "rope_freqs.weight"}
  missing = sorted(set(want) - set(tensors), key=_natural)
  if missing:
    raise CheckpointError(
        f"{path!r} lacks {len(missing)} tensor(s) its metadata implies: {missing[:8]}"
        f"{' ...' if len(missing) > 8 else ''}; the file is incomplete or its metadata is wrong.")
  extra = sorted(set(tensors) - set(want), key=_natural)
  if extra:
    raise CheckpointError(
        f"{path!r} holds {len(extra)} tensor(s) a {arch} model of its metadata does not have: "
        f"{extra[:8]}{' ...' if len(extra) > 8 else ''} (more layers or biases than "
        f"{arch}.block_count and the other keys say?).")
  names = {}
  for name, shape in want.items():
    have = tuple(int(x) for x in reversed(tensors[name].shape.tolist()))
    if have != shape:
      raise CheckpointError(
          f"{path!r}: tensor {name!r} has shape {have} (torch layout) but the metadata implies "
          f"{shape} (hidden {cfg['hidden_size']}, heads {cfg['num_attention_heads']}/"
          f"{cfg['num_key_value_heads']} x {cfg['head_dim']}, ffn {cfg['intermediate_size']}, "
          f"vocab {cfg['vocab_size']}).")
    names[name] = torch_name(arch, name)
  return names


def _natural(name: str):
  return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def read_config(path) -> dict:
  """The transformers config dict of a GGUF file (`open_gguf(path).config`).

  Example:
    >>> read_config("model.gguf")["model_type"]
    'llama'
  """
  return open_gguf(path).config


def lazy_state(path, *, dtype=None) -> dict[str, Callable[[], np.ndarray]]:
  """{torch name: reader} of a GGUF file, as `hf_io.lazy_state` gives for a folder.

  Example:
    >>> params, missing, unused = hf_io.to_flax(lazy_state("model.gguf"), abstract, prefix="model")
  """
  return open_gguf(path).lazy_state(dtype=dtype)
