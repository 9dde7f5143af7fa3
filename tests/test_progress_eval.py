"""What a run shows and records (tqdm bar, metrics.jsonl, TensorBoard) and eval.py on checkpoints."""

import json
import pathlib
import struct
import subprocess
import sys

import numpy as np
import pytest

from doran_jax import evaluate, experiment, progress
from test_trainer import tiny_config

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_flatten_metrics_keeps_numeric_leaves_with_prefixes():
  flat = progress.flatten_metrics({"accuracy": 0.5, "n": 32, "ok": True, "name": "x",
                                   "commonsense": {"boolq": 0.25}}, "eval/")
  assert flat == {"eval/accuracy": 0.5, "eval/n": 32.0, "eval/commonsense/boolq": 0.25}


def _tensorboard_scalars(logdir: pathlib.Path) -> dict[str, dict[int, float]]:
  """Reads tensorboardX event files (TFRecord framing) without TensorFlow."""
  from tensorboardX.proto import event_pb2
  scalars: dict[str, dict[int, float]] = {}
  for path in logdir.glob("events.out.tfevents.*"):
    data = path.read_bytes()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 12 + length + 4
      for value in event.summary.value:
        scalars.setdefault(value.tag, {})[event.step] = value.simple_value
  return scalars


def test_metrics_jsonl_tensorboard_and_progress_bar(shared_data, tmp_path, capsys):
  c = tiny_config(shared_data, tmp_path, "kind=text,method=dora", num_steps=3,
                  progress_bar=True, tensorboard=True)
  results = experiment.train(c)
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  train, final = records[:-1], records[-1]
  assert [r["step"] for r in train] == [1, 2, 3]
  for r, h in zip(train, results["history"]):
    assert r["train/loss"] == pytest.approx(h["loss"]) and r["train/lr"] == pytest.approx(h["lr"])
    assert r["train/examples_per_s"] > 0 and 0.0 <= r["train/accuracy"] <= 1.0
    assert np.isfinite(r["train/grad_norm"])
  assert final["step"] == 3 and final["eval/accuracy"] == pytest.approx(results["eval"]["accuracy"])
  tb = _tensorboard_scalars(tmp_path / "tensorboard")
  assert tb["train/loss"] == pytest.approx({r["step"]: r["train/loss"] for r in train}, rel=1e-6)
  assert tb["eval/accuracy"][3] == pytest.approx(final["eval/accuracy"], rel=1e-6)
  err = capsys.readouterr().err
  assert "3/3" in err and "loss=" in err and "ex_s=" in err   # the tqdm bar and its postfix


def test_eval_of_latest_and_named_checkpoints(shared_data, tmp_path):
  c = tiny_config(shared_data, tmp_path, "kind=text,method=doran", num_steps=4,
                  **{"checkpoint.every": 2, "checkpoint.max_to_keep": None})
  results = experiment.train(c)
  latest = experiment.evaluate_run(c, workdir=str(tmp_path))
  assert latest["step"] == 4
  assert latest["accuracy"] == pytest.approx(results["eval"]["accuracy"])
  assert latest["eval_loss"] == pytest.approx(results["eval"]["eval_loss"], rel=1e-5)
  assert json.loads((tmp_path / "eval_step4.json").read_text())["accuracy"] == latest["accuracy"]
  early = experiment.evaluate_run(c, workdir=str(tmp_path), step=2)
  assert early["step"] == 2 and early["eval_loss"] != pytest.approx(latest["eval_loss"], rel=1e-6)
  with pytest.raises(ValueError, match=r"no checkpoint for step 3 .* holds steps \[2, 4\]"):
    experiment.evaluate_run(c, workdir=str(tmp_path), step=3)
  # The entry point: one JSON line on stdout, for the named step.
  proc = subprocess.run(
      [sys.executable, "eval.py", "--config", "configs/tiny.py:kind=text,method=doran",
       f"--config.data.path={shared_data / 'text' / 'sst2'}", f"--workdir={tmp_path}", "--step=2"],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  printed = json.loads(proc.stdout.strip().splitlines()[-1])
  assert printed["step"] == 2 and printed["eval_loss"] == pytest.approx(early["eval_loss"], rel=1e-5)


def test_summary_table_marks_metrics_a_baseline_does_not_have():
  results = {"method": "dora", "trainable_params": 1234, "train_minutes": 1.25,
             "eval": {"accuracy": 0.9, "macro_f1": 0.8, "mcc": 0.7, "eval_loss": 0.3, "n": 10},
             "baselines": {"majority": {"accuracy": 0.5, "macro_f1": 0.3, "mcc": 0.0}}}
  lines = experiment.summary_table(results).splitlines()
  assert lines[0] == "| run | accuracy | macro_f1 | mcc | eval_loss | trainable params | train min |"
  assert lines[2] == "| dora | 0.9000 | 0.8000 | 0.7000 | 0.3000 | 1,234 | 1.2 |"
  assert lines[3] == "| baseline: majority | 0.5000 | 0.3000 | 0.0000 | — | 0 | 0.0 |"
