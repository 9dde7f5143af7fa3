"""Files from outside can't hurt us (issue 32, item 11): an adapter export carries the SHA-256 of
its files and is refused when they differ, or when it holds NaN/inf or a non-positive rank or alpha.

Every hostile folder is built here, tiny.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os

import jax
import numpy as np
import pytest

from doran_jax import checkpoint, errors, experiment
from doran_jax.adapters.config import AdapterConfig


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
