"""Parity of our Flax LLaMA-family decoder (doran_jax.models.modeling.decoder) with transformers.

Each case builds a tiny random PyTorch model from a config, perturbs every weight (norms and
biases included, so a norm's offset or a missing bias shows), saves it as safetensors, loads it
through hf_io into our module and compares float32 outputs on a right-padded batch at the real
positions: max |ours - torch| <= 1e-5 · max |torch|.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import linen as nn  # noqa: E402
from flax import traverse_util  # noqa: E402

from doran_jax.models import hf_io  # noqa: E402
from doran_jax.models.modeling import decoder, rope  # noqa: E402

RTOL = 1e-5
BASE = dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            pad_token_id=0, bos_token_id=1, eos_token_id=None)
CONFIGS = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config",
           "qwen3": "Qwen3Config", "gemma3_text": "Gemma3TextConfig"}
GEMMA = dict(head_dim=8, query_pre_attn_scalar=16, sliding_window=4, sliding_window_pattern=2,
             num_hidden_layers=3, rope_theta=1e6, rope_local_base_freq=1e4,
             rope_scaling={"rope_type": "linear", "factor": 2.0},
             # transformers ignores attn_logit_softcapping for Gemma 3; so must we.
             attn_logit_softcapping=5.0, final_logit_softcapping=3.0)
AUTO = {"causal_lm": "AutoModelForCausalLM", "classification": "AutoModelForSequenceClassification",
        "features": "AutoModel"}


def _config(model_type, **overrides):
  return getattr(transformers, CONFIGS[model_type])(**{**BASE, **overrides})


def _torch_model(config, task="causal_lm", seed=0):
  torch.manual_seed(seed)
  model = getattr(transformers, AUTO[task]).from_config(config, attn_implementation="eager")
  gen = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn(p.shape, generator=gen))
  return model.eval()


def _batch(t, b=3, vocab=128, seed=0):
  """Right-padded ids (no pad id 0 among real tokens) and their mask; lengths t, t-3, t-5."""
  rng = np.random.RandomState(seed)
  ids = rng.randint(1, vocab, (b, t))
  mask = np.ones((b, t), np.int64)
  for row, n in enumerate([t, t - 3, t - 5][:b]):
    mask[row, n:] = 0
    ids[row, n:] = 0
  return ids, mask


def _torch_out(model, ids, mask, task="causal_lm"):
  with torch.no_grad():
    out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
  return (out.last_hidden_state if task == "features" else out.logits).numpy()


def _load(path, task, dtype=jnp.float32, num_labels=None):
  cfg = hf_io.read_config(str(path))
  module = decoder.build(cfg, task, dtype=dtype, num_labels=num_labels)
  dummy = {"input_ids": jnp.ones((1, 4), jnp.int32), "attention_mask": jnp.ones((1, 4), jnp.int32)}
  abstract = jax.eval_shape(module.init, jax.random.key(0), dummy)["params"]
  params, missing, unused = hf_io.to_flax(hf_io.read_state(str(path)), abstract,
                                          tied=decoder.tied_params(cfg, task), prefix="model")
  assert not missing, missing
  return module, params, unused


def _apply(module, params, ids, mask):
  batch = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask)}
  return np.asarray(jax.jit(module.apply)({"params": params}, batch), np.float32)


def _assert_close(ours, ref, rtol=RTOL):
  err, scale = float(np.abs(ours - ref).max()), float(np.abs(ref).max())
  assert err <= rtol * scale, f"max error {err:.3g} > {rtol} x logit scale {scale:.3g}"


CASES = {
    "llama_gqa": ("llama", {}, 12),
    "llama_linear": ("llama", dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), 12),
    # 80 > max_position_embeddings: the NTK base grows with the batch's length.
    "llama_dynamic_long": ("llama", dict(rope_scaling={"type": "dynamic", "factor": 2.0}), 80),
    # head_dim 16, theta 1e4: wavelengths 6.3 (kept), 20 and 63 (smoothed), 199+ (scaled).
    "llama3": ("llama", dict(hidden_size=64, rope_theta=1e4, max_position_embeddings=512,
                             rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                           "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                           "original_max_position_embeddings": 64}), 12),
    "yarn": ("llama", dict(hidden_size=64, rope_scaling={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
        "beta_fast": 8.0, "beta_slow": 1.0}), 20),
    "llama_biases": ("llama", dict(attention_bias=True, mlp_bias=True), 12),
    "mistral_window": ("mistral", dict(sliding_window=5), 16),
    # Tied embeddings, q/k/v biases; layer 0 full, layers 1-2 sliding (window 4).
    "qwen2_tied_window": ("qwen2", dict(tie_word_embeddings=True, use_sliding_window=True,
                                        sliding_window=4, max_window_layers=1,
                                        num_hidden_layers=3), 12),
    # head_dim 16 != hidden / heads: q is 64 wide on a 32 model.
    "qwen3_qknorm": ("qwen3", dict(head_dim=16), 12),
    "gemma3_text": ("gemma3_text", GEMMA, 14),
}


@pytest.mark.parametrize("name", list(CASES))
def test_causal_lm_logits_match_torch(name, tmp_path):
  model_type, overrides, t = CASES[name]
  config = _config(model_type, **overrides)
  model = _torch_model(config)
  model.save_pretrained(tmp_path)
  module, params, unused = _load(tmp_path, "causal_lm")
  assert not unused, unused
  tied = bool(config.tie_word_embeddings)
  assert ("lm_head" in params) is not tied
  ids, mask = _batch(t)
  real = mask.astype(bool)
  _assert_close(_apply(module, params, ids, mask)[real], _torch_out(model, ids, mask)[real])


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
def test_classification_matches_torch(model_type, tmp_path):
  config = _config(model_type, num_labels=3, **(GEMMA if model_type == "gemma3_text" else {}))
  model = _torch_model(config, "classification")
  model.save_pretrained(tmp_path)
  module, params, unused = _load(tmp_path, "classification")
  assert not unused, unused
  assert set(params) == {"model", "score"} and set(params["score"]) == {"kernel"}
  assert decoder.head_regex("classification") == r"score/.*"
  ids, mask = _batch(12)
  ours = _apply(module, params, ids, mask)
  assert ours.shape == (3, 3)
  _assert_close(ours, _torch_out(model, ids, mask))


def test_features_match_torch_bare_and_from_causal_checkpoint(tmp_path):
  config = _config("qwen3", head_dim=16)
  ids, mask = _batch(12)
  real = mask.astype(bool)
  # A bare torch Qwen3Model checkpoint: names without `model.`, as our features params.
  bare = _torch_model(config, "features")
  bare.save_pretrained(tmp_path / "bare")
  module, params, unused = _load(tmp_path / "bare", "features")
  assert not unused and "model" not in params and "embed_tokens" in params
  hidden = _apply(module, params, ids, mask)
  assert hidden.shape == (3, 12, 32)
  _assert_close(hidden[real], _torch_out(bare, ids, mask, "features")[real])
  # A causal-LM checkpoint loads into the features module too (prefix dropped, lm_head unused).
  lm = _torch_model(config)
  lm.save_pretrained(tmp_path / "lm")
  module, params, unused = _load(tmp_path / "lm", "features")
  assert unused == ["lm_head.weight"]
  _assert_close(_apply(module, params, ids, mask)[real],
                _torch_out(lm.model, ids, mask, "features")[real])


@pytest.mark.parametrize("model_type,overrides", [("llama", {}),
                                                  ("qwen2", dict(tie_word_embeddings=True))])
def test_round_trip_to_torch(model_type, overrides, tmp_path):
  config = _config(model_type, **overrides)
  _torch_model(config).save_pretrained(tmp_path / "src")
  module, params, _ = _load(tmp_path / "src", "causal_lm")
  # Our own edit of the weights must be what torch then computes.
  leaves, tree = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  params = jax.tree_util.tree_unflatten(
      tree, [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
  hf_io.save_pretrained(params, hf_io.read_config(str(tmp_path / "src")), str(tmp_path / "out"))
  back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"),
                                                           attn_implementation="eager").eval()
  ids, mask = _batch(10)
  real = mask.astype(bool)
  _assert_close(_apply(module, params, ids, mask)[real], _torch_out(back, ids, mask)[real])


def test_greedy_generate_matches_torch_generate(tmp_path):
  config = _config("llama")
  model = _torch_model(config)
  model.save_pretrained(tmp_path)
  module, params, _ = _load(tmp_path, "causal_lm")
  ids, mask = _batch(7)
  n = 6
  # Right-padded batch in ours; each row decoded alone (KV cache) in torch.
  out = np.asarray(decoder.greedy_generate(module, params, ids, mask, max_new_tokens=n))
  assert out.shape == (3, 7 + n)
  for row in range(3):
    length = int(mask[row].sum())
    with torch.no_grad():
      ref = model.generate(torch.tensor(ids[row:row + 1, :length]), do_sample=False,
                           max_new_tokens=n, pad_token_id=0)[0].numpy()
    np.testing.assert_array_equal(out[row, :length + n], ref)
    assert (out[row, length + n:] == 0).all()
  # With an eos: torch stops after it, ours pads after it.
  eos = int(out[0, 7 + 2])
  stopped = np.asarray(decoder.greedy_generate(module, params, ids, mask, max_new_tokens=n,
                                               eos_token_id=eos))
  with torch.no_grad():
    ref = model.generate(torch.tensor(ids[:1]), do_sample=False, max_new_tokens=n,
                         pad_token_id=0, eos_token_id=eos)[0].numpy()
  np.testing.assert_array_equal(stopped[0, :len(ref)], ref)
  assert (stopped[0, len(ref):] == 0).all()


def test_bfloat16_params_and_compute(tmp_path):
  config = _config("llama")
  model = _torch_model(config)
  model.save_pretrained(tmp_path)
  module, params, _ = _load(tmp_path, "causal_lm", dtype=jnp.bfloat16)
  params16 = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.bfloat16), params)
  ids, mask = _batch(12)
  real = mask.astype(bool)
  batch = {"input_ids": ids, "attention_mask": mask}
  logits16 = jax.jit(module.apply)({"params": params16}, batch)
  assert logits16.dtype == jnp.bfloat16
  _assert_close(np.asarray(logits16, np.float32)[real], _torch_out(model, ids, mask)[real],
                rtol=0.05)


def test_every_projection_is_a_dense_at_its_param_path():
  cfg = _config("gemma3_text", **GEMMA).to_dict()
  module = decoder.build(cfg, "causal_lm")
  batch = {"input_ids": jnp.ones((1, 4), jnp.int32)}
  params = jax.eval_shape(module.init, jax.random.key(0), batch)["params"]
  kernels = {p[:-len("/kernel")] for p in ("/".join(k) for k in traverse_util.flatten_dict(params))
             if p.endswith("/kernel")}
  seen = set()

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, nn.Dense) and context.method_name == "__call__":
      seen.add("/".join(context.module.scope.path))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    jax.eval_shape(module.apply, {"params": params}, batch)
  assert seen == kernels
  assert "model/layers/2/self_attn/q_proj" in seen and "model/layers/0/mlp/down_proj" in seen
  # Gemma ties by default: no lm_head, the logits read the embedding.
  assert "lm_head" not in params
  assert decoder.tied_params(cfg, "causal_lm") == [("lm_head/kernel",
                                                   "model/embed_tokens/embedding")]


def test_layer_types_from_older_config_keys():
  """Configs without `layer_types` (older config.json files) derive the same per-layer windows."""
  gemma = _config("gemma3_text", **GEMMA).to_dict()
  derived = {k: v for k, v in gemma.items() if k != "layer_types"}
  assert decoder.DecoderConfig.from_hf(derived).windows == (4, None, 4)
  qwen = _config("qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=1,
                 num_hidden_layers=3).to_dict()
  del qwen["layer_types"]
  assert decoder.DecoderConfig.from_hf(qwen).windows == (None, 4, 4)
  mistral = _config("mistral", sliding_window=5).to_dict()
  assert decoder.DecoderConfig.from_hf(mistral).windows == (5, 5)
  assert decoder.DecoderConfig.from_hf(_config("llama").to_dict()).windows == (None, None)


ROPE_SCALINGS = [
    None,
    {"rope_type": "linear", "factor": 3.0},
    {"type": "dynamic", "factor": 2.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 32},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
    {"rope_type": "yarn", "factor": 2.0, "mscale": 1.0, "mscale_all_dim": 0.5, "truncate": False,
     "beta_fast": 16.0, "beta_slow": 2.0},
    {"rope_type": "yarn", "factor": 2.0, "attention_factor": 0.9},
]


@pytest.mark.parametrize("scaling", ROPE_SCALINGS, ids=lambda s: str(s and list(s.values())[:2]))
def test_inv_freq_and_scaling_match_transformers(scaling):
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
  config = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4,
                                    max_position_embeddings=64, rope_theta=5e5,
                                    rope_scaling=scaling)
  cfg = config.to_dict()
  params = rope.rope_parameters(cfg)
  for seq_len in (None, 64, 100):
    if params["rope_type"] == "default":
      # transformers 5 keeps the default rope in the model class, not in ROPE_INIT_FUNCTIONS.
      ref, ref_scale = 1.0 / (5e5 ** (np.arange(0, 16, 2, dtype=np.float64) / 16)), 1.0
    else:
      ref, ref_scale = ROPE_INIT_FUNCTIONS[params["rope_type"]](config, None, seq_len)
      ref = ref.numpy()
    ours, scale = rope.inv_freq(cfg, params, seq_len)
    np.testing.assert_allclose(np.asarray(ours), ref, rtol=1e-6)
    assert scale == pytest.approx(ref_scale, rel=1e-12)
  # The transformers 5 dialect (`rope_parameters`, theta inside) reads the same.
  v5 = {k: v for k, v in cfg.items() if k not in ("rope_scaling", "rope_theta")}
  v5["rope_parameters"] = {**(scaling or {"rope_type": "default"}), "rope_theta": 5e5}
  assert rope.rope_parameters(v5) == params


def test_gemma3_rope_per_layer_type_both_dialects():
  cfg = _config("gemma3_text", **GEMMA).to_dict()
  assert rope.rope_parameters(cfg, "sliding_attention")["rope_theta"] == 1e4
  assert rope.rope_parameters(cfg, "sliding_attention")["rope_type"] == "default"
  assert rope.rope_parameters(cfg, "full_attention")["rope_type"] == "linear"
  v4_keys = ("rope_scaling", "rope_theta", "rope_local_base_freq")
  v5 = {k: v for k, v in cfg.items() if k not in v4_keys}
  v5["rope_parameters"] = {"sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
                           "full_attention": {"rope_type": "linear", "factor": 2.0,
                                              "rope_theta": 1e6}}
  for t in ("sliding_attention", "full_attention"):
    assert rope.rope_parameters(v5, t) == rope.rope_parameters(cfg, t)


def test_partial_rotary_matches_transformers_phi3():
  from transformers.models.phi3 import modeling_phi3
  config = transformers.Phi3Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=4,
                                   partial_rotary_factor=0.5, max_position_embeddings=64)
  cfg = config.to_dict()
  params = rope.rope_parameters(cfg)
  assert rope.rotary_dim(cfg, params) == 8
  x = np.random.RandomState(0).randn(2, 9, 4, 16).astype(np.float32)      # (B, T, H, D)
  positions = np.stack([np.arange(9), np.arange(9) + 5])
  cos, sin = modeling_phi3.Phi3RotaryEmbedding(config)(torch.tensor(x), torch.tensor(positions))
  x_t = torch.tensor(x).transpose(1, 2)
  ref, _ = modeling_phi3.apply_rotary_pos_emb(x_t, x_t, cos, sin)
  ours = rope.apply_rotary(jnp.asarray(x), jnp.asarray(positions), *rope.inv_freq(cfg, params))
  np.testing.assert_allclose(np.asarray(ours), ref.transpose(1, 2).numpy(), rtol=1e-5, atol=1e-6)


def test_remat_decoder_gives_the_same_logits_and_gradients():
  """model.remat wraps each decoder block in nn.remat: same numbers, the blocks are checkpointed."""
  from doran_jax import models
  cfg = models.tiny_config("llama", attention_dropout=0.1)
  plain = models.from_config(cfg, "causal_lm")
  remat = models.from_config(cfg, "causal_lm", remat=True)
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map(
      lambda x: jnp.asarray(x + 0.02 * rng.standard_normal(x.shape), x.dtype), plain.params)
  ids = rng.integers(0, cfg.vocab_size, (2, 9)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[1, 6:] = 0
  batch = {"input_ids": ids, "attention_mask": mask}
  w = jnp.asarray(rng.standard_normal((2, 9, cfg.vocab_size)), jnp.float32)

  def grads(bb):
    def loss(p):
      return jnp.sum(bb.apply(p, batch, train=True, rng=jax.random.key(3)) * w)
    return jax.jit(jax.value_and_grad(loss))(params)

  (l_plain, g_plain), (l_remat, g_remat) = grads(plain), grads(remat)
  # The loss is a sum of ~2,000 signed terms that largely cancel: compare it to their magnitude
  # (float32 rounding of such a sum is ~1e-7 of it).
  terms = plain.apply(params, batch, train=True, rng=jax.random.key(3)) * w
  assert abs(float(l_remat) - float(l_plain)) <= 1e-6 * float(jnp.sum(jnp.abs(terms))), (
      l_remat, l_plain)
  for a, b in zip(jax.tree_util.tree_leaves(g_remat), jax.tree_util.tree_leaves(g_plain)):
    # Recomputation reorders float32 sums: agree to 1e-5 of each gradient's scale.
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(np.max(np.abs(b))))
  jaxpr = str(jax.make_jaxpr(lambda p: remat.apply(p, batch, train=True,
                                                   rng=jax.random.key(3)))(params))
  assert jaxpr.count("checkpoint[") + jaxpr.count("remat") >= cfg.num_hidden_layers
  assert "checkpoint[" not in str(jax.make_jaxpr(lambda p: plain.apply(p, batch))(params))
