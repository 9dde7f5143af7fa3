"""Files from outside can't hurt us (issue 32, items 2, 4 and 11, and tokenizer files): exports
carry checksums and refuse NaN/inf; PEFT headers are checked against the model before any data is
read; a config.json that names another architecture or custom code is refused; tokenizer files
stay inside their folder and are never written through a symlink.

Every hostile folder is built here, tiny.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil

import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

from doran_jax import checkpoint, errors, experiment, models, peft_io
from doran_jax.adapters import init_adapters
from doran_jax.adapters.config import AdapterConfig
from doran_jax.models import hf_io
# The shared tiny model (a fixture), its tensors, and the spy on what the loader reads.
from test_untrusted_files import _reads, _tensors, tiny_bert  # noqa: F401

QUERY = "bert.encoder.layer.0.attention.self.query"


def _flip_byte(file, offset: int = -5) -> None:
  data = bytearray(open(file, "rb").read())
  data[offset] ^= 0x40
  open(file, "wb").write(bytes(data))


# ---------------------------------------------------------------- 11. adapter exports: checksums


def _export(folder, lora_b=None, cfg=None) -> str:
  trainable = {"params": {"classifier": {"bias": np.zeros((2,), np.float32)}},
               "adapters": {"targets": {"m": {
                   "lora_a": np.ones((4, 2), np.float32),
                   "lora_b": np.zeros((2, 4), np.float32) if lora_b is None else lora_b}}}}
  checkpoint.export_adapters(str(folder), trainable, cfg or AdapterConfig(method="lora", rank=2))
  return str(folder)


def test_adapter_export_records_checksums_and_a_flipped_byte_is_refused(tmp_path):
  folder = _export(tmp_path / "adapters")
  record = json.loads(open(os.path.join(folder, "checksums.json")).read())
  assert sorted(record["sha256"]) == ["adapter_config.json", "adapters.msgpack"]
  assert checkpoint.load_adapters(folder)[1].rank == 2
  for name in ("adapters.msgpack", "adapter_config.json"):
    original = open(os.path.join(folder, name), "rb").read()
    # The last bytes: a float of lora_b (msgpack still parses) / the JSON's closing brace.
    _flip_byte(os.path.join(folder, name), -3 if name == "adapters.msgpack" else -1)
    with pytest.raises(errors.CheckpointError, match=f"{name!r} in .* is damaged: its SHA-256 does "
                       "not match .*checksums.json.*Re-export it .* or retrain"):
      checkpoint.load_adapters(folder)
    open(os.path.join(folder, name), "wb").write(original)
  assert checkpoint.load_adapters(folder)[1].rank == 2


def _resum(folder) -> None:
  """Records the files' current SHA-256 in checksums.json (where there is one), as if the
  exporter itself had written what they now hold."""
  path = os.path.join(folder, "checksums.json")
  if os.path.exists(path):
    record = json.loads(open(path).read())
    record["sha256"] = {n: hashlib.sha256(open(os.path.join(folder, n), "rb").read()).hexdigest()
                        for n in record["sha256"]}
    open(path, "w").write(json.dumps(record))


def test_adapter_export_without_checksums_loads_with_a_warning(tmp_path, caplog):
  folder = _export(tmp_path / "adapters")
  if os.path.exists(os.path.join(folder, "checksums.json")):
    os.remove(os.path.join(folder, "checksums.json"))  # as written before checksums existed
  with caplog.at_level(logging.WARNING):
    assert checkpoint.load_adapters(folder)[1].rank == 2
  assert any("has no checksums.json" in r.getMessage() for r in caplog.records)
  open(os.path.join(folder, "checksums.json"), "w").write("{\"version\": 1, \"sha")  # cut short
  with pytest.raises(errors.CheckpointError, match="checksums.json in .* is damaged"):
    checkpoint.load_adapters(folder)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_adapter_export_is_refused(tmp_path, bad):
  lora_b = np.zeros((2, 4), np.float32)
  lora_b[1, 2] = bad
  folder = _export(tmp_path / "adapters", lora_b=lora_b)  # checksums match: the NaN is real
  with pytest.raises(errors.CheckpointError, match=r"non-finite values \(NaN or inf\) in 1 "
                     r"tensor\(s\): adapters/targets/m/lora_b \(1 of 8 values\).*Retrain"):
    checkpoint.load_adapters(folder)


@pytest.mark.parametrize("key,value", [("alpha", math.nan), ("alpha", math.inf), ("alpha", 0.0),
                                       ("alpha", -4.0), ("rank", 0), ("rank", 2.5)])
def test_adapter_export_with_a_bad_rank_or_alpha_is_refused(tmp_path, key, value):
  folder = _export(tmp_path / "adapters")
  path = os.path.join(folder, "adapter_config.json")
  record = json.loads(open(path).read())
  record["adapter"][key] = value
  open(path, "w").write(json.dumps(record))  # json writes NaN and Infinity as bare words
  _resum(folder)  # the checksums match: the bad value is what was exported
  with pytest.raises(errors.CheckpointError, match=f"adapter_config.json, 'adapter'\\): {key} is "
                     f"{value!r}; it must be"):
    checkpoint.load_adapters(folder)


def test_eval_of_a_nan_adapter_export_is_an_error_not_a_nan_metric(shared_data, tmp_path):
  from doran_jax import run as run_lib
  from test_trainer import tiny_config
  c = tiny_config(shared_data, tmp_path, "kind=text,method=lora", num_steps=2)
  run = run_lib.setup(c)
  nan = jax.tree_util.tree_map(lambda x: np.full(np.shape(x), np.nan, np.float32),
                               jax.device_get(run.state.trainable))
  folder = tmp_path / "export" / "adapters"
  checkpoint.export_adapters(str(folder), nan, run.adapter_cfg, {"step": 2})
  with pytest.raises(errors.CheckpointError, match="non-finite values"):
    experiment.evaluate_run(c, adapters_dir=str(folder))
  assert not (folder / "eval.json").exists()


# ---------------------------------------------------------------- 2 and 11. PEFT adapters


@pytest.fixture
def peft_folder(tmp_path, tiny_bert):
  cfg = AdapterConfig(method="dora", rank=2, targets=r".*/(query|value)/kernel")
  adapters = init_adapters(jax.random.key(0), tiny_bert.params, cfg)
  folder = str(tmp_path / "peft")
  peft_io.save_peft_adapter(folder, tiny_bert.params, adapters, cfg, base_model_name_or_path="b")
  return folder


def _set_tensor(folder, name, value) -> None:
  file = os.path.join(folder, peft_io.WEIGHTS_NAME)
  state = _tensors(file)
  assert name in state
  state[name] = value
  save_file(state, file, metadata={"format": "pt"})


def _set_config(folder, **changes) -> None:
  path = os.path.join(folder, peft_io.CONFIG_NAME)
  config = json.loads(open(path).read())
  config.update(changes)
  open(path, "w").write(json.dumps(config))


def test_peft_saved_adapter_still_loads(peft_folder, tiny_bert):
  adapters, cfg = peft_io.load_peft_adapter(peft_folder, tiny_bert.params)
  assert cfg.method == "dora" and cfg.rank == 2


def test_peft_header_shape_is_checked_against_the_model_before_reading(peft_folder, tiny_bert,
                                                                      monkeypatch):
  name = f"base_model.model.{QUERY}.lora_A.weight"
  _set_tensor(peft_folder, name, np.zeros((2, 3200), np.float32))  # the model's in is 32
  read = _reads(monkeypatch)
  with pytest.raises(errors.CheckpointError, match=rf"shape mismatch for {name!r} .* has "
                     r"\(2, 3200\), the model expects \(2, 32\).* needs \(2, 32\)"):
    peft_io.load_peft_adapter(peft_folder, tiny_bert.params)
  assert read == []  # refused from the headers: no tensor's data was read


@pytest.mark.parametrize("kind", ["lora_A.weight", "lora_B.weight", "lora_magnitude_vector"])
def test_peft_integer_factor_is_refused_before_reading(peft_folder, tiny_bert, monkeypatch, kind):
  name = f"base_model.model.{QUERY}.{kind}"
  shape = _tensors(os.path.join(peft_folder, peft_io.WEIGHTS_NAME))[name].shape
  _set_tensor(peft_folder, name, np.ones(shape, np.int32))
  read = _reads(monkeypatch)
  with pytest.raises(errors.CheckpointError, match=rf"{name!r} .* is stored as I32, but .* "
                     "floating-point"):
    peft_io.load_peft_adapter(peft_folder, tiny_bert.params)
  assert name not in read
  with pytest.raises(errors.CheckpointError, match="is stored as I32"):
    peft_io.read_peft_adapter(peft_folder)


@pytest.mark.parametrize("bad", [math.nan, -math.inf])
def test_peft_non_finite_tensor_is_refused(peft_folder, tiny_bert, bad):
  name = f"base_model.model.{QUERY}.lora_B.weight"
  value = _tensors(os.path.join(peft_folder, peft_io.WEIGHTS_NAME))[name].copy()
  value[0, 0] = bad
  _set_tensor(peft_folder, name, value)
  for load in (lambda: peft_io.load_peft_adapter(peft_folder, tiny_bert.params),
               lambda: peft_io.read_peft_adapter(peft_folder)):
    with pytest.raises(errors.CheckpointError, match=rf"non-finite values .*{name}"):
      load()


@pytest.mark.parametrize("changes,key", [
    ({"lora_alpha": math.nan}, "lora_alpha"), ({"lora_alpha": math.inf}, "lora_alpha"),
    ({"lora_alpha": 0}, "lora_alpha"), ({"lora_alpha": -8}, "lora_alpha"),
    ({"lora_alpha": "8"}, "lora_alpha"), ({"r": 0}, "r"), ({"r": 2.5}, "r"),
    ({"alpha_pattern": {"query": math.nan}}, "query"), ({"rank_pattern": {"query": 0}}, "query")])
def test_peft_config_numbers_must_be_finite_and_positive(peft_folder, tiny_bert, changes, key):
  _set_config(peft_folder, **changes)
  for load in (lambda: peft_io.load_peft_adapter(peft_folder, tiny_bert.params),
               lambda: peft_io.read_peft_adapter(peft_folder)):
    with pytest.raises(errors.CheckpointError, match=rf"adapter_config.json in .*: {key} is "
                       ".*; it must be a (finite number > 0|positive integer)"):
      load()


# ---------------------------------------------------------------- 4. config.json of a model folder


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory, tiny_bert):
  folder = str(tmp_path_factory.mktemp("bert") / "model")
  models.save_pretrained(tiny_bert, tiny_bert.params, folder)
  return folder


def _with_config(bert_folder, tmp_path, **changes) -> str:
  """A copy of the BERT folder whose config.json has `changes`."""
  folder = tmp_path / "model"
  shutil.copytree(bert_folder, folder)
  config = json.loads((folder / hf_io.CONFIG).read_text())
  config.update(changes)
  (folder / hf_io.CONFIG).write_text(json.dumps(config))
  return str(folder)


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "roberta"])
def test_bert_weights_under_another_familys_model_type_are_refused(bert_folder, tmp_path,
                                                                   model_type):
  src = _with_config(bert_folder, tmp_path, model_type=model_type)
  with pytest.raises(errors.CheckpointError, match=rf"config.json says model_type {model_type!r}, "
                     r"but \d+ of the \d+ parameters .* are not in its weights .*"
                     r"'bert.embeddings.*Set 'model_type' in config.json"):
    models.load_backbone(src, "classification", num_labels=2)


def test_unknown_model_type_is_refused_naming_config_json(bert_folder, tmp_path):
  src = _with_config(bert_folder, tmp_path, model_type="frobnicator")
  with pytest.raises(errors.CheckpointError, match=r"config.json' has model_type 'frobnicator', "
                     r"which is not one of doran_jax's families \(bert, .*\). Set 'model_type'"):
    models.load_backbone(src, "classification", num_labels=2)


def test_auto_map_is_refused(bert_folder, tmp_path):
  src = _with_config(bert_folder, tmp_path,
                     auto_map={"AutoModel": "modeling_evil.EvilModel"})
  with pytest.raises(errors.CheckpointError, match=r"config.json' has 'auto_map' .*never runs.* "
                     "delete 'auto_map' from config.json"):
    models.load_backbone(src, "classification", num_labels=2)
  # The unchanged folder still loads.
  assert models.load_backbone(bert_folder, "classification", num_labels=2).family.name == "bert"


# ---------------------------------------------------------------- tokenizer files


def _tokenizer():
  from tokenizers import Tokenizer, models as tok_models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast
  vocab = {"[UNK]": 0, "[PAD]": 1, "hello": 2, "world": 3}
  tok = Tokenizer(tok_models.WordLevel(vocab, unk_token="[UNK]"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json"])
def test_tokenizer_file_symlinked_out_of_the_folder_is_refused(tmp_path, name):
  folder = tmp_path / "model"
  _tokenizer().save_pretrained(str(folder))
  assert models.load_tokenizer(str(folder))("hello world")["input_ids"] == [2, 3]
  os.replace(folder / name, tmp_path / name)
  os.symlink(tmp_path / name, folder / name)
  with pytest.raises(errors.CheckpointError, match=f"tokenizer file {name!r} in .* lies outside "
                     "that folder"):
    models.load_tokenizer(str(folder))


def test_save_pretrained_never_writes_the_tokenizer_through_a_symlink(tmp_path, tiny_bert):
  victim = tmp_path / "victim.txt"
  victim.write_text("precious")
  out = tmp_path / "out"
  os.makedirs(out)
  os.symlink(victim, out / "tokenizer.json")
  with pytest.raises(errors.UserError, match="tokenizer.json' is a symlink"):
    models.save_pretrained(tiny_bert, tiny_bert.params, str(out), tokenizer=_tokenizer(),
                           overwrite=True)
  assert victim.read_text() == "precious"
  assert not [n for n in os.listdir(out) if n.startswith(".staging")]  # no temp folder left
  os.remove(out / "tokenizer.json")
  models.save_pretrained(tiny_bert, tiny_bert.params, str(out), tokenizer=_tokenizer(),
                         overwrite=True)
  assert {"tokenizer.json", "tokenizer_config.json", "config.json"} <= set(os.listdir(out))
  assert not [n for n in os.listdir(out) if n.startswith(".staging")]
  assert models.load_tokenizer(str(out))("hello world")["input_ids"] == [2, 3]
