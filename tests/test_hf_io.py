"""doran_jax.models.hf_io: safetensors folders <-> our Flax params, round trips through PyTorch.

Writing is checked by loading our saved folders with PyTorch transformers' Auto classes; reading
by sharded, bf16, renamed, prefix-less and tied checkpoints; errors by their messages.
"""

from __future__ import annotations

import json
import os

import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
from flax import traverse_util  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

from doran_jax.models import hf_io  # noqa: E402
from doran_jax.models.modeling import bert, gpt2, vit  # noqa: E402

from test_modeling_encoders import (AUTO, FAMILIES, assert_close, inputs_for, load,  # noqa: E402
                                    torch_model, torch_out)

BF16 = ml_dtypes.bfloat16


def _flat(tree):
  return traverse_util.flatten_dict(tree, sep="/")


def _abstract(family, d, task):
  module = family.build(d, task)
  return module, jax.eval_shape(module.init, jax.random.PRNGKey(0), family.dummy_batch(d, 1, 4))["params"]


def _torch_state(model):
  return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def test_naming_rule():
  assert hf_io.torch_name("bert/encoder/layer/0/attention/self/query/kernel") == \
      "bert.encoder.layer.0.attention.self.query.weight"
  assert hf_io.torch_name("bert/embeddings/word_embeddings/embedding") == \
      "bert.embeddings.word_embeddings.weight"
  assert hf_io.torch_name("bert/embeddings/LayerNorm/scale") == "bert.embeddings.LayerNorm.weight"
  assert hf_io.torch_name("classifier/bias") == "classifier.bias"
  assert hf_io.torch_name("vit/embeddings/cls_token") == "vit.embeddings.cls_token"


def test_layouts_against_torch_state(tmp_path):
  """Linear kernels transposed, Conv1D kept, conv kernels (O, I, kh, kw) -> (kh, kw, I, O)."""
  tm = torch_model("gpt2", "causal_lm")
  state = _torch_state(tm)
  d = tm.config.to_dict()
  _, abstract = _abstract(gpt2, d, "causal_lm")
  params, missing, unused = hf_io.to_flax(state, abstract, no_transpose=gpt2.NO_TRANSPOSE,
                                          tied=gpt2.tied_params(d, "causal_lm"), prefix="transformer")
  flat = _flat(params)
  np.testing.assert_array_equal(flat["transformer/h/0/attn/c_attn/kernel"],
                                state["transformer.h.0.attn.c_attn.weight"])
  assert flat["transformer/h/0/attn/c_attn/kernel"].shape == (32, 96)
  np.testing.assert_array_equal(flat["transformer/h/1/mlp/c_proj/kernel"],
                                state["transformer.h.1.mlp.c_proj.weight"])
  # The tied head reads wte: torch's state dict lists the alias, our model has no such param.
  assert missing == [] and unused == ["lm_head.weight"]
  tv = torch_model("vit", "image_classification")
  # The checkpoint's names, as written to disk: transformers 5 renames ViT's modules in memory
  # (e.g. attention.attention.query -> attention.q_proj) and back when it saves.
  tv.save_pretrained(tmp_path / "vit")
  sv = hf_io.read_state(str(tmp_path / "vit"))
  _, abstract = _abstract(vit, tv.config.to_dict(), "image_classification")
  params, _, _ = hf_io.to_flax(sv, abstract, prefix="vit")
  conv = _flat(params)["vit/embeddings/patch_embeddings/projection/kernel"]
  np.testing.assert_array_equal(conv, sv["vit.embeddings.patch_embeddings.projection.weight"]
                                .transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(_flat(params)["vit/encoder/layer/0/attention/attention/query/kernel"],
                                sv["vit.encoder.layer.0.attention.attention.query.weight"].T)
  # And back: to_torch_names inverts every layout.
  back = hf_io.to_torch_names(params)
  assert set(back) == set(sv)
  for k in sv:
    np.testing.assert_array_equal(back[k], sv[k])


@pytest.mark.parametrize("name,task", [("bert", "classification"), ("roberta", "classification"),
                                       ("vit", "image_classification"), ("gpt2", "causal_lm"),
                                       ("gpt2", "classification"), ("bert", "features")])
def test_round_trip_through_torch(tmp_path, name, task):
  """ours -> save_pretrained -> transformers' Auto class (PyTorch) gives our outputs."""
  family = FAMILIES[name][0]
  src, out = tmp_path / "src", tmp_path / "out"
  tm = torch_model(name, task, seed=1)
  tm.save_pretrained(src)
  module, params, _, _ = load(family, src, task)
  # Change every weight so a copied-through file could not pass.
  params = jax.tree_util.tree_map(lambda x: x * 1.01 + 0.003, params)
  d = hf_io.read_config(src)
  drop = [p for p, _ in family.tied_params(d, task)]
  hf_io.save_pretrained(params, d, str(out), no_transpose=family.NO_TRANSPOSE, drop=drop)
  assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
  reloaded = getattr(transformers, AUTO[task]).from_pretrained(out, attn_implementation="eager").eval()
  batch = inputs_for(name, reloaded.config)
  ours = module.apply({"params": params}, batch)
  assert_close(ours, torch_out(reloaded, task, batch), batch.get("attention_mask"))


def _write_two_shards(state: dict, folder):
  names = sorted(state)
  half = len(names) // 2
  os.makedirs(folder, exist_ok=True)
  weight_map = {}
  for i, part in enumerate((names[:half], names[half:])):
    file = f"model-{i + 1:05d}-of-00002.safetensors"
    save_file({n: np.ascontiguousarray(state[n]) for n in part}, os.path.join(folder, file),
              metadata={"format": "pt"})
    weight_map.update({n: file for n in part})
  with open(os.path.join(folder, hf_io.INDEX), "w") as f:
    json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)


def test_sharded_checkpoint_loads_identically(tmp_path):
  tm = torch_model("bert", "classification")
  tm.save_pretrained(tmp_path / "single")
  single = hf_io.read_state(tmp_path / "single")
  _write_two_shards(single, tmp_path / "sharded")
  sharded = hf_io.read_state(tmp_path / "sharded")
  assert set(sharded) == set(single)
  for k in single:
    np.testing.assert_array_equal(sharded[k], single[k])
  # iter_state goes shard by shard, in the index's order.
  files = hf_io.weight_files(tmp_path / "sharded")
  assert [os.path.basename(f) for f in files] == ["model-00001-of-00002.safetensors",
                                                  "model-00002-of-00002.safetensors"]
  first = [n for n, _ in hf_io.iter_state(tmp_path / "sharded")][:len(single) // 2]
  assert first == sorted(single)[:len(single) // 2]
  d = hf_io.read_config(tmp_path / "single")
  _, abstract = _abstract(bert, d, "classification")
  a, _, _ = hf_io.to_flax(single, abstract, prefix="bert")
  b, _, _ = hf_io.to_flax(sharded, abstract, prefix="bert")
  jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


def test_save_pretrained_shards_and_transformers_reads_them(tmp_path):
  tm = torch_model("bert", "classification")
  tm.save_pretrained(tmp_path / "src")
  module, params, _, _ = load(bert, tmp_path / "src", "classification")
  files = hf_io.save_pretrained(params, hf_io.read_config(tmp_path / "src"), str(tmp_path / "out"),
                                max_shard_bytes=40_000)
  assert len(files) > 1 and os.path.isfile(tmp_path / "out" / hf_io.INDEX)
  _, again, _, _ = load(bert, tmp_path / "out", "classification")
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, again)
  reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(
      tmp_path / "out", attn_implementation="eager").eval()
  batch = inputs_for("bert", reloaded.config)
  assert_close(module.apply({"params": params}, batch), torch_out(reloaded, "classification", batch))


def test_bf16_cast_on_host(tmp_path):
  tm = torch_model("bert", "classification")
  tm.save_pretrained(tmp_path)
  state = hf_io.read_state(tmp_path, dtype=BF16)
  assert all(x.dtype == BF16 for x in state.values()), {k: x.dtype for k, x in state.items()}
  # A dtype name or jnp's dtype works too.
  import jax.numpy as jnp
  assert {x.dtype for x in hf_io.read_state(tmp_path, dtype="bfloat16").values()} == {np.dtype(BF16)}
  assert {x.dtype for x in hf_io.read_state(tmp_path, dtype=jnp.bfloat16).values()} == {np.dtype(BF16)}
  assert all(isinstance(x, np.ndarray) for x in state.values())
  ref = _torch_state(tm)
  for k, x in state.items():
    np.testing.assert_array_equal(x, ref[k].astype(BF16))
  d = hf_io.read_config(tmp_path)
  _, abstract = _abstract(bert, d, "classification")
  params, missing, _ = hf_io.to_flax(state, abstract, prefix="bert")
  assert missing == []
  assert {x.dtype for x in jax.tree_util.tree_leaves(params)} == {np.dtype(BF16)}


def test_bf16_checkpoint_reads_as_bf16_and_int_buffers_keep_their_type(tmp_path):
  tm = torch_model("bert", "classification").to(torch.bfloat16)
  tm.save_pretrained(tmp_path)
  names_dtypes = {n: x.dtype for n, x in hf_io.iter_state(tmp_path)}
  assert set(names_dtypes.values()) == {np.dtype(BF16)}
  as_f32 = hf_io.read_state(tmp_path, dtype=np.float32)
  assert {x.dtype for x in as_f32.values()} == {np.dtype(np.float32)}
  # An integer buffer (old checkpoints' position_ids) is not cast.
  save_file({"embeddings.position_ids": np.arange(4, dtype=np.int64)[None],
             "w": np.ones(3, np.float32)}, str(tmp_path / "model.safetensors"))
  s = hf_io.read_state(tmp_path, dtype=BF16)
  assert s["embeddings.position_ids"].dtype == np.int64 and s["w"].dtype == BF16


def test_bare_checkpoint_into_task_model_and_back(tmp_path):
  """A BertModel checkpoint (no 'bert.' prefix) feeds a classifier; the head is reported missing."""
  tm = torch_model("bert", "features")
  tm.save_pretrained(tmp_path)
  _, params, missing, unused = load(bert, tmp_path, "classification", init_missing=False)
  assert missing == ["classifier/bias", "classifier/kernel"]
  assert unused == []
  import re
  assert all(re.fullmatch(bert.head_regex("classification"), p) for p in missing)
  np.testing.assert_array_equal(_flat(params)["bert/encoder/layer/1/output/dense/kernel"],
                                tm.state_dict()["encoder.layer.1.output.dense.weight"].numpy().T)
  # A task checkpoint into the bare model: the pooler and head go unused.
  tc = torch_model("bert", "classification")
  tc.save_pretrained(tmp_path / "cls")
  _, _, missing, unused = load(bert, tmp_path / "cls", "features")
  assert missing == []
  assert unused == ["bert.pooler.dense.bias", "bert.pooler.dense.weight", "classifier.bias",
                    "classifier.weight"]


def test_renames_for_old_layernorm_names(tmp_path):
  tm = torch_model("bert", "classification")
  state = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
           for k, v in _torch_state(tm).items()}
  assert any(k.endswith("LayerNorm.gamma") for k in state)
  d = tm.config.to_dict()
  _, abstract = _abstract(bert, d, "classification")
  params, missing, unused = hf_io.to_flax(state, abstract, renames=bert.RENAMES, prefix="bert")
  assert missing == [] and unused == []
  ref, _, _ = hf_io.to_flax(_torch_state(tm), abstract, prefix="bert")
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, ref)


def test_tied_param_filled_from_its_source_transposed_when_needed():
  abstract = {"emb": {"embedding": jax.ShapeDtypeStruct((7, 3), np.float32)},
              "head": {"kernel": jax.ShapeDtypeStruct((3, 7), np.float32)},
              "copy": {"embedding": jax.ShapeDtypeStruct((7, 3), np.float32)}}
  w = np.arange(21, dtype=np.float32).reshape(7, 3)
  tied = [("head/kernel", "emb/embedding"), ("copy/embedding", "emb/embedding"),
          ("absent/kernel", "emb/embedding")]
  params, missing, unused = hf_io.to_flax({"emb.weight": w}, abstract, tied=tied)
  assert missing == [] and unused == []
  np.testing.assert_array_equal(params["head"]["kernel"], w.T)
  np.testing.assert_array_equal(params["copy"]["embedding"], w)
  # A checkpoint that has the tied tensor keeps its own.
  own = np.ones((7, 3), np.float32)
  params, _, _ = hf_io.to_flax({"emb.weight": w, "head.weight": own}, abstract, tied=tied)
  np.testing.assert_array_equal(params["head"]["kernel"], own.T)
  with pytest.raises(ValueError, match="its source 'emb/embedding' was not loaded"):
    hf_io.to_flax({}, abstract, tied=tied)
  with pytest.raises(ValueError, match=r"\(variables\['params'\]\), not the variables dict"):
    hf_io.to_flax({"emb.weight": w}, {"params": abstract})


def test_gpt2_untied_lm_head(tmp_path):
  """tie_word_embeddings=False: our model gets its own lm_head/kernel, loaded and saved."""
  tm = torch_model("gpt2", "causal_lm", tie_word_embeddings=False)
  tm.save_pretrained(tmp_path / "src")
  d = hf_io.read_config(tmp_path / "src")
  assert gpt2.tied_params(d, "causal_lm") == ()
  module, params, missing, unused = load(gpt2, tmp_path / "src", "causal_lm")
  assert missing == [] and unused == []
  np.testing.assert_array_equal(_flat(params)["lm_head/kernel"], tm.lm_head.weight.detach().numpy().T)
  batch = inputs_for("gpt2", tm.config)
  ours = module.apply({"params": params}, batch)
  assert_close(ours, torch_out(tm, "causal_lm", batch), batch["attention_mask"])
  hf_io.save_pretrained(params, d, str(tmp_path / "out"), no_transpose=gpt2.NO_TRANSPOSE)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
  assert_close(ours, torch_out(reloaded, "causal_lm", batch), batch["attention_mask"])


def test_missing_files_name_the_folder_and_its_contents(tmp_path):
  (tmp_path / "notes.txt").write_text("x")
  with pytest.raises(FileNotFoundError, match=r"no config\.json in .*it holds: notes\.txt"):
    hf_io.read_config(tmp_path)
  with pytest.raises(FileNotFoundError, match=r"no model\.safetensors or .*notes\.txt"):
    hf_io.read_state(tmp_path)
  (tmp_path / "pytorch_model.bin").write_bytes(b"")
  with pytest.raises(FileNotFoundError, match="PyTorch pickles"):
    hf_io.read_state(tmp_path)
  with open(tmp_path / hf_io.INDEX, "w") as f:
    json.dump({"weight_map": {"a": "model-00001-of-00002.safetensors"}}, f)
  with pytest.raises(FileNotFoundError, match="names shards that are not there"):
    hf_io.read_state(tmp_path)


def test_shape_mismatch_names_tensor_and_both_shapes(tmp_path):
  tm = torch_model("bert", "classification")  # 3 labels
  tm.save_pretrained(tmp_path)
  d = hf_io.read_config(tmp_path)
  module = bert.build(d, "classification", num_labels=5)
  abstract = jax.eval_shape(module.init, jax.random.PRNGKey(0), bert.dummy_batch(d))["params"]
  state = hf_io.read_state(tmp_path)
  with pytest.raises(ValueError, match=r"shape mismatch for 'classifier\.bias' -> 'classifier/bias': "
                     r"the checkpoint has \(3,\), the model expects \(5,\)"):
    hf_io.to_flax(state, abstract, prefix="bert")
  del state["classifier.bias"]
  with pytest.raises(ValueError, match=r"shape mismatch for 'classifier\.weight' -> 'classifier/kernel'"
                     r": the checkpoint has \(3, 32\) \(torch layout; \(32, 3\) in ours\), the "
                     r"model expects \(32, 5\)"):
    hf_io.to_flax(state, abstract, prefix="bert")
