"""Files from outside can't hurt us (issue 32): loaders never open a file outside the folder they
were given, check every tensor's header before reading it, and writers never write through a
symlink, over someone else's folder, or over the model they loaded.

Every hostile folder is built here, tiny, from a random backbone saved with `models.save_pretrained`.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from doran_jax import checkpoint, errors, experiment, peft_io
from doran_jax import models
from doran_jax.adapters.config import AdapterConfig
from doran_jax.models import hf_io

QUERY = "bert.encoder.layer.0.attention.self.query.weight"


@pytest.fixture(scope="module")
def tiny_bert():
  return models.from_config(models.tiny_config("bert"), "classification", num_labels=2)


def _model_folder(bb, folder) -> str:
  models.save_pretrained(bb, bb.params, str(folder))
  return str(folder)


def _tensors(file) -> dict[str, np.ndarray]:
  with safe_open(str(file), framework="np") as f:
    return {k: f.get_tensor(k) for k in f.keys()}


def _sharded_with_entry(tmp_path, bb, entry_for_second: str):
  """A model folder whose index sends half the tensors to shard `entry_for_second` (which, for
  the hostile entries, really exists outside the folder and holds those tensors)."""
  src = _model_folder(bb, tmp_path / "model")
  state = _tensors(os.path.join(src, hf_io.WEIGHTS))
  os.remove(os.path.join(src, hf_io.WEIGHTS))
  names = sorted(state)
  first, second = names[:len(names) // 2], names[len(names) // 2:]
  save_file({k: state[k] for k in first}, os.path.join(src, "model-00001-of-00002.safetensors"),
            metadata={"format": "pt"})
  outside = tmp_path / "outside.safetensors"
  save_file({k: state[k] for k in second}, str(outside), metadata={"format": "pt"})
  weight_map = {k: "model-00001-of-00002.safetensors" for k in first}
  weight_map.update({k: entry_for_second.format(outside=outside) for k in second})
  with open(os.path.join(src, hf_io.INDEX), "w") as f:
    json.dump({"metadata": {}, "weight_map": weight_map}, f)
  return src


# ---------------------------------------------------------------------- 1. names stay inside


@pytest.mark.parametrize("entry", ["../outside.safetensors", "{outside}",
                                   "../../../../../../../../etc/passwd"])
def test_index_entries_outside_the_folder_are_refused(tmp_path, tiny_bert, entry):
  src = _sharded_with_entry(tmp_path, tiny_bert, entry)
  shown = entry.format(outside=tmp_path / "outside.safetensors")
  with pytest.raises(errors.CheckpointError, match=r"model.safetensors.index.json entry "
                     + repr(shown).replace("\\", "\\\\").replace(".", r"\.") + " .*outside"):
    models.load_backbone(src, "classification", num_labels=2)


def test_index_shard_symlinked_out_of_the_folder_is_refused(tmp_path, tiny_bert):
  src = _sharded_with_entry(tmp_path, tiny_bert, "model-00002-of-00002.safetensors")
  os.symlink(tmp_path / "outside.safetensors", os.path.join(src, "model-00002-of-00002.safetensors"))
  with pytest.raises(errors.CheckpointError, match=r"'model-00002-of-00002.safetensors' .* "
                     r"lies outside that folder .*symlinks pointing out"):
    hf_io.weight_files(src)
  # The same shard as a real file inside the folder loads, and gives the same weights.
  os.remove(os.path.join(src, "model-00002-of-00002.safetensors"))
  os.replace(tmp_path / "outside.safetensors", os.path.join(src, "model-00002-of-00002.safetensors"))
  bb = models.load_backbone(src, "classification", num_labels=2)
  np.testing.assert_array_equal(
      bb.params["bert"]["encoder"]["layer"]["0"]["attention"]["self"]["query"]["kernel"],
      tiny_bert.params["bert"]["encoder"]["layer"]["0"]["attention"]["self"]["query"]["kernel"])


def test_config_and_single_weights_symlinked_out_are_refused(tmp_path, tiny_bert):
  src = _model_folder(tiny_bert, tmp_path / "model")
  for name in (hf_io.CONFIG, hf_io.WEIGHTS):
    os.replace(os.path.join(src, name), tmp_path / name)
    os.symlink(tmp_path / name, os.path.join(src, name))
    with pytest.raises(errors.CheckpointError, match=f"{name!r} in .* lies outside that folder"):
      models.load_backbone(src, "classification", num_labels=2)
    os.remove(os.path.join(src, name))
    os.replace(tmp_path / name, os.path.join(src, name))


def test_hub_cache_snapshot_symlinks_into_its_blobs_are_allowed(tmp_path, tiny_bert):
  """transformers' cache layout: snapshots/<rev>/<file> -> ../../blobs/<hash>."""
  repo = tmp_path / "models--org--tiny"
  snapshot = repo / "snapshots" / "abc123"
  src = _model_folder(tiny_bert, tmp_path / "plain")
  os.makedirs(repo / "blobs")
  os.makedirs(snapshot)
  for i, name in enumerate(sorted(os.listdir(src))):
    os.replace(os.path.join(src, name), repo / "blobs" / f"blob{i}")
    os.symlink(f"../../blobs/blob{i}", snapshot / name)
  bb = models.load_backbone(str(snapshot), "classification", num_labels=2)
  np.testing.assert_array_equal(bb.params["classifier"]["kernel"],
                                tiny_bert.params["classifier"]["kernel"])
  # The exception is the repo's blobs/ only, not anything else in the cache.
  os.remove(snapshot / hf_io.CONFIG)
  (tmp_path / "elsewhere.json").write_text("{}")
  os.symlink(tmp_path / "elsewhere.json", snapshot / hf_io.CONFIG)
  with pytest.raises(errors.CheckpointError, match="lies outside that folder"):
    hf_io.read_config(str(snapshot))


def _peft_folder(folder) -> str:
  os.makedirs(folder)
  with open(os.path.join(folder, peft_io.CONFIG_NAME), "w") as f:
    json.dump({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["query"]}, f)
  save_file({"base_model.model.q.lora_A.weight": np.ones((2, 4), np.float32)},
            os.path.join(folder, peft_io.WEIGHTS_NAME))
  return str(folder)


@pytest.mark.parametrize("name", [peft_io.CONFIG_NAME, peft_io.WEIGHTS_NAME])
def test_peft_adapter_files_symlinked_out_are_refused(tmp_path, name):
  folder = _peft_folder(tmp_path / "adapter")
  assert peft_io.read_peft_adapter(folder)[0]["r"] == 2  # the honest folder reads
  os.replace(os.path.join(folder, name), tmp_path / name)
  os.symlink(tmp_path / name, os.path.join(folder, name))
  with pytest.raises(errors.CheckpointError, match=f"{name!r} in .* lies outside that folder"):
    peft_io.read_peft_adapter(folder)


@pytest.mark.parametrize("name", ["adapter_config.json", "adapters.msgpack"])
def test_adapter_export_files_symlinked_out_are_refused(tmp_path, name):
  folder = tmp_path / "export" / "adapters"
  trainable = {"params": {}, "adapters": {"targets": {"m": {"lora_a": np.ones((4, 2), np.float32)}}}}
  checkpoint.export_adapters(str(folder), trainable, AdapterConfig(method="lora", rank=2))
  assert checkpoint.load_adapters(str(folder))[1].rank == 2
  os.replace(folder / name, tmp_path / name)
  os.symlink(tmp_path / name, folder / name)
  with pytest.raises(errors.CheckpointError, match=f"{name!r} in .* lies outside that folder"):
    checkpoint.load_adapters(str(folder))


# ---------------------------------------------------------------------- 2. headers before data


def _replace_tensor(src: str, name: str, value: np.ndarray) -> None:
  state = _tensors(os.path.join(src, hf_io.WEIGHTS))
  state[name] = value
  save_file(state, os.path.join(src, hf_io.WEIGHTS), metadata={"format": "pt"})


def _reads(monkeypatch) -> list[str]:
  read = []
  original = hf_io._read_one

  def spy(file, name, dtype):
    read.append(name)
    return original(file, name, dtype)
  monkeypatch.setattr(hf_io, "_read_one", spy)
  return read


def test_header_shape_is_checked_before_the_tensor_is_read(tmp_path, tiny_bert, monkeypatch):
  src = _model_folder(tiny_bert, tmp_path / "model")
  # An embedding the header says is 100x larger than the model's (128, 32).
  _replace_tensor(src, "bert.embeddings.word_embeddings.weight", np.zeros((12800, 32), np.float32))
  read = _reads(monkeypatch)
  with pytest.raises(errors.CheckpointError,
                     match=r"shape mismatch for 'bert.embeddings.word_embeddings.weight' .* "
                           r"has \(12800, 32\).* expects \(128, 32\)"):
    models.load_backbone(src, "classification", num_labels=2)
  assert "bert.embeddings.word_embeddings.weight" not in read


def test_header_shape_in_torch_layout_names_both_layouts(tmp_path, tiny_bert, monkeypatch):
  src = _model_folder(tiny_bert, tmp_path / "model")
  _replace_tensor(src, "bert.encoder.layer.0.intermediate.dense.weight",
                  np.zeros((32, 48), np.float32))  # torch's Linear is (out=48, in=32)
  read = _reads(monkeypatch)
  with pytest.raises(errors.CheckpointError, match=r"has \(32, 48\) \(torch layout; \(48, 32\) in "
                     r"ours\), the model expects \(32, 48\)"):
    models.load_backbone(src, "classification", num_labels=2)
  assert "bert.encoder.layer.0.intermediate.dense.weight" not in read


def test_integer_kernel_is_refused(tmp_path, tiny_bert, monkeypatch):
  src = _model_folder(tiny_bert, tmp_path / "model")
  _replace_tensor(src, QUERY, np.ones((32, 32), np.int32))
  read = _reads(monkeypatch)
  with pytest.raises(errors.CheckpointError, match=f"{QUERY!r} .* is stored as I32, but the model "
                     "expects a floating-point kernel"):
    models.load_backbone(src, "classification", num_labels=2)
  assert QUERY not in read
  # Also for a state already in memory (read_state): the array's own dtype is checked.
  state = hf_io.read_state(src)
  abstract = tiny_bert.params
  with pytest.raises(errors.CheckpointError, match="is stored as int32"):
    hf_io.to_flax(state, abstract, prefix="bert")


# ---------------------------------------------------------------------- 3. safe result writers


def test_write_json_never_writes_through_a_symlink_and_is_atomic(tmp_path):
  from doran_jax import files
  victim = tmp_path / "victim.txt"
  victim.write_text("precious")
  link = tmp_path / "out" / "eval.json"
  os.makedirs(link.parent)
  os.symlink(victim, link)
  with pytest.raises(errors.UserError, match="is a symlink .*refusing to write through it"):
    files.write_json(link, {"accuracy": 1.0})
  assert victim.read_text() == "precious" and os.path.islink(link)
  plain = tmp_path / "out" / "results.json"
  files.write_json(plain, {"a": 1})
  files.write_json(plain, {"a": 2})
  assert json.loads(plain.read_text()) == {"a": 2}
  assert sorted(os.listdir(tmp_path / "out")) == ["eval.json", "results.json"]  # no temp left


def test_results_json_is_not_written_through_a_symlink(tmp_path):
  victim = tmp_path / "victim.txt"
  victim.write_text("precious")
  os.symlink(victim, tmp_path / "results.json")
  with pytest.raises(errors.UserError, match="results.json' is a symlink"):
    experiment._write_results(str(tmp_path), {"accuracy": 0.5})
  assert victim.read_text() == "precious"


def test_every_writer_refuses_a_symlink(tmp_path, tiny_bert):
  """The writers in doran_jax/ that take a path: export, metrics.jsonl, run.json, CSV."""
  from doran_jax import analysis, progress
  victim = tmp_path / "victim.txt"
  victim.write_text("precious")
  export = tmp_path / "export"
  os.makedirs(export)
  os.symlink(victim, export / "adapters.msgpack")
  with pytest.raises(errors.UserError, match="is a symlink"):
    checkpoint.export_adapters(str(export), {"params": {}}, AdapterConfig(method="lora", rank=2))
  os.symlink(victim, tmp_path / "metrics.jsonl")
  writer = progress.MetricWriter(str(tmp_path), total_steps=1, progress_bar=False)
  with pytest.raises(errors.UserError, match="is a symlink"):
    writer.write(1, {"loss": 1.0})
  os.symlink(victim, tmp_path / "rows.csv")
  with pytest.raises(errors.UserError, match="is a symlink"):
    analysis.write_csv([{"method": "lora"}], str(tmp_path / "rows.csv"))
  assert victim.read_text() == "precious"


def test_eval_of_an_adapter_export_never_writes_through_eval_json_symlink(shared_data, tmp_path):
  from test_trainer import tiny_config
  c = tiny_config(shared_data, tmp_path, "kind=text,method=lora", num_steps=2)
  experiment.train(c)
  adapters = tmp_path / "export" / "adapters"
  victim = tmp_path / "victim.txt"
  victim.write_text("precious")
  os.symlink(victim, adapters / "eval.json")
  with pytest.raises(errors.UserError, match="eval.json' is a symlink"):
    experiment.evaluate_run(c, adapters_dir=str(adapters))
  assert victim.read_text() == "precious"
  os.remove(adapters / "eval.json")
  metrics = experiment.evaluate_run(c, adapters_dir=str(adapters))
  assert json.loads((adapters / "eval.json").read_text())["accuracy"] == metrics["accuracy"]


# ---------------------------------------------------------------------- 4. no silent overwrite


def test_save_pretrained_refuses_a_non_empty_folder_unless_overwrite(tmp_path, tiny_bert):
  out = tmp_path / "out"
  os.makedirs(out)
  (out / "notes.txt").write_text("mine")
  with pytest.raises(errors.UserError, match=r"'.*out' is not empty \(it holds notes.txt\).*"
                     "overwrite=True"):
    models.save_pretrained(tiny_bert, tiny_bert.params, str(out))
  assert os.listdir(out) == ["notes.txt"]
  models.save_pretrained(tiny_bert, tiny_bert.params, str(out), overwrite=True)
  bb = models.load_backbone(str(out), "classification", num_labels=2)
  np.testing.assert_array_equal(bb.params["classifier"]["kernel"],
                                tiny_bert.params["classifier"]["kernel"])
  assert (out / "notes.txt").read_text() == "mine"  # files that are not ours stay


def test_save_pretrained_never_writes_the_folder_the_backbone_came_from(tmp_path, tiny_bert):
  src = _model_folder(tiny_bert, tmp_path / "model")
  before = {n: open(os.path.join(src, n), "rb").read() for n in os.listdir(src)}
  bb = models.load_backbone(src, "classification", num_labels=2)
  assert bb.source == os.path.realpath(src)
  doubled = {**bb.params, "classifier": {k: v * 2 for k, v in bb.params["classifier"].items()}}
  for spelling in (src, src + os.sep, os.path.join(src, "..", "model")):
    with pytest.raises(errors.UserError, match="is the folder the model was loaded from"):
      models.save_pretrained(bb, doubled, spelling, overwrite=True)
  os.symlink(src, tmp_path / "link")
  with pytest.raises(errors.UserError, match="is a symlink"):
    models.save_pretrained(bb, doubled, str(tmp_path / "link"), overwrite=True)
  assert {n: open(os.path.join(src, n), "rb").read() for n in os.listdir(src)} == before


def test_save_peft_adapter_refuses_another_adapter_unless_overwrite(tmp_path, tiny_bert):
  import jax
  from doran_jax.adapters import init_adapters
  cfg = AdapterConfig(method="lora", rank=2, targets=r".*query/kernel")
  adapters = init_adapters(jax.random.key(0), tiny_bert.params, cfg)
  other = _peft_folder(tmp_path / "theirs")
  before = {n: open(os.path.join(other, n), "rb").read() for n in os.listdir(other)}
  with pytest.raises(errors.UserError, match="is not empty"):
    peft_io.save_peft_adapter(other, tiny_bert.params, adapters, cfg, base_model_name_or_path="b")
  assert {n: open(os.path.join(other, n), "rb").read() for n in os.listdir(other)} == before
  os.symlink(tmp_path / "nowhere", tmp_path / "link")
  with pytest.raises(errors.UserError, match="is a symlink"):
    peft_io.save_peft_adapter(str(tmp_path / "link"), tiny_bert.params, adapters, cfg,
                              base_model_name_or_path="b", overwrite=True)
  assert not os.path.exists(tmp_path / "nowhere")
  peft_io.save_peft_adapter(other, tiny_bert.params, adapters, cfg, base_model_name_or_path="b",
                            overwrite=True)
  assert peft_io.read_peft_adapter(other)[0]["r"] == 2
