"""Run identity (doran_jax.fingerprint): a reused workdir resumes only the run it holds.

One tiny run (4 steps, checkpoints at 2 and 4) is trained once per module; every test works on
its own copy of that workdir.
"""

import json
import os
import shutil

import numpy as np
import pytest

from configs import tiny
from doran_jax import data, errors, experiment, fingerprint, progress
from doran_jax import run as run_lib
from test_trainer import tiny_config

STEPS = 4


def _config(shared_data, workdir, **overrides):
  return tiny_config(shared_data, workdir, "kind=text,method=lora", **{
      "num_steps": STEPS, "checkpoint.every": 2, "checkpoint.max_to_keep": None, **overrides})


@pytest.fixture(scope="module")
def trained(shared_data, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("trained")
  results = experiment.train(_config(shared_data, workdir))
  assert results["status"] == "done" and results["train_minutes"] > 0
  return workdir, results


@pytest.fixture
def workdir(trained, tmp_path):
  out = tmp_path / "run"
  shutil.copytree(trained[0], out)
  return out


def _snapshot(workdir):
  """Bytes of every file under workdir (what 'nothing was overwritten' compares)."""
  return {str(p.relative_to(workdir)): p.read_bytes() for p in sorted(workdir.rglob("*"))
          if p.is_file()}


@pytest.fixture
def no_loading(monkeypatch):
  """Any data or model load fails the test: the checks must come before them."""
  def refuse(*args, **kwargs):
    raise AssertionError("data or model was loaded")
  monkeypatch.setattr(data, "load_dataset", refuse)
  monkeypatch.setattr(run_lib, "load_model", refuse)
  monkeypatch.setattr(run_lib, "load_tokenizer", refuse)


# ---------------------------------------------------------------------------- the fingerprint


def test_identity_ignores_logging_eval_and_layout_keys_but_not_training_keys(shared_data, tmp_path):
  base = fingerprint.identity(_config(shared_data, tmp_path))
  for key, value in [("log_every", 7), ("progress_bar", True), ("checkpoint.every", 1),
                     ("checkpoint.max_to_keep", 5), ("export.merged", True),
                     ("eval_batch_size", 4), ("mesh", "data:1"), ("data.eval_limit", 8),
                     ("resume", "force"), ("adapter.mode", "merged")]:
    assert fingerprint.identity(_config(shared_data, tmp_path, **{key: value})) == base, key
  assert fingerprint.identity(_config(shared_data, tmp_path / "elsewhere")) == base
  for key, value in [("optim.lr", 2e-3), ("adapter.alpha", 64.0), ("seed", 1), ("num_steps", 5),
                     ("batch_size", 4), ("data.limit", 32), ("freeze", (".*",)),
                     ("model.dtype", "bfloat16"), ("optim.schedule", "cosine")]:
    changed = fingerprint.identity(_config(shared_data, tmp_path, **{key: value}))
    assert fingerprint.differences(base, changed) == [
        f"{key}: {json.dumps(base[key])} -> {json.dumps(changed[key])}"], key


def test_a_record_from_before_a_key_existed_matches_that_keys_old_value(shared_data, tmp_path):
  now = fingerprint.identity(_config(shared_data, tmp_path))
  older = {k: v for k, v in now.items() if k not in fingerprint.ADDED_KEYS}
  assert set(now) - set(older) == {"data.packing", "data.drop_long"}
  assert fingerprint.differences(older, now) == []
  packed = fingerprint.identity(_config(shared_data, tmp_path, **{"data.packing": True}))
  assert fingerprint.differences(older, packed) == ["data.packing: false -> true"]


def test_a_relative_and_an_absolute_data_path_are_the_same_run(shared_data, tmp_path, monkeypatch):
  monkeypatch.chdir(shared_data.parent)
  relative = fingerprint.identity(_config(shared_data, tmp_path, **{"data.path": "data/text/sst2"}))
  assert relative == fingerprint.identity(_config(shared_data, tmp_path))


# ------------------------------------------------------------------------------- train reuse


def test_first_run_records_its_fingerprint(trained, shared_data):
  workdir, results = trained
  record = json.loads((workdir / "run.json").read_text())
  config = _config(shared_data, workdir)
  assert record["fingerprint"] == fingerprint.digest(fingerprint.identity(config))
  assert record["config"]["optim.lr"] == config.optim.lr
  digest = record["resolved"].pop("data_digest")
  assert record["resolved"] == {"num_steps": STEPS, "train_examples": 64, "num_classes": 2}
  assert len(digest) == 16 and int(digest, 16) >= 0
  assert results["eval"]["n"] == 32


@pytest.mark.parametrize("change", [{"adapter.alpha": 64.0}, {"optim.lr": 0.01},
                                    {"adapter.alpha": 64.0, "optim.lr": 0.01}])
def test_changed_settings_stop_before_anything_is_overwritten(shared_data, workdir, no_loading,
                                                              change):
  before = _snapshot(workdir)
  c = _config(shared_data, workdir, **change)
  for entry in (experiment.train, experiment.run_experiment):
    with pytest.raises(errors.RunMismatchError) as info:
      entry(c, str(workdir))
    message = str(info.value)
    for key, value in change.items():
      old = _config(shared_data, workdir)
      node_old, node_new = old, c
      for part in key.split("."):
        node_old, node_new = node_old[part], node_new[part]
      assert f"{key}: {json.dumps(node_old)} -> {json.dumps(node_new)}" in message
    assert f"{len(change)} setting(s) differ" in message
    assert "--config.resume=force" in message and f"--config.workdir={workdir}-" in message
  assert _snapshot(workdir) == before  # results.json, export, metrics.jsonl, checkpoints


def test_finished_run_says_complete_and_rewrites_nothing(shared_data, workdir, no_loading, capsys):
  before = _snapshot(workdir)
  saved = json.loads((workdir / "results.json").read_text())
  out = experiment.run_experiment(_config(shared_data, workdir), str(workdir))
  assert out["status"] == "complete"
  assert out["train_minutes"] == saved["train_minutes"] > 0  # not 0 from a no-op rerun
  assert out["eval"] == saved["eval"]
  assert "this run is complete" in capsys.readouterr().out
  assert _snapshot(workdir) == before


def test_forced_resume_continues_under_the_new_settings(shared_data, workdir, trained):
  c = _config(shared_data, workdir, num_steps=6, resume="force")
  results = experiment.train(c, str(workdir))
  assert results["status"] == "done" and results["steps"] == 6
  assert [h["step"] for h in results["history"]] == [5, 6]  # resumed at 4, not from scratch
  record = json.loads((workdir / "run.json").read_text())
  assert record["config"]["num_steps"] == 6 and record["resolved"]["num_steps"] == 6
  assert record["forced"][0]["from"] == json.loads(
      (trained[0] / "run.json").read_text())["fingerprint"]
  assert "num_steps: 4 -> 6" in record["forced"][0]["differences"]
  train_steps = [r["step"] for r in map(json.loads, (workdir / "metrics.jsonl").read_text()
                                        .splitlines()) if "train/loss" in r]
  assert train_steps == [1, 2, 3, 4, 5, 6]
  # The continued run is now the workdir's run: the same config without force is complete.
  again = experiment.train(_config(shared_data, workdir, num_steps=6), str(workdir))
  assert again["status"] == "complete"


def test_resume_from_an_older_checkpoint_truncates_metrics(shared_data, workdir, trained):
  # A crash after step 4 whose last checkpoint is step 2: steps 3-4 are recorded but lost.
  shutil.rmtree(workdir / "checkpoints" / "4")
  os.remove(workdir / "results.json")
  first = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  results = experiment.train(_config(shared_data, workdir), str(workdir))
  assert [h["step"] for h in results["history"]] == [3, 4]
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  train = [r for r in records if "train/loss" in r]
  assert [r["step"] for r in train] == [1, 2, 3, 4]  # no duplicate records
  assert len([r for r in records if "eval/accuracy" in r]) == 1
  # Exact resume: the re-run steps are the lost ones, value for value.
  old = {r["step"]: r["train/loss"] for r in first if "train/loss" in r}
  np.testing.assert_allclose([r["train/loss"] for r in train], [old[s] for s in (1, 2, 3, 4)],
                             rtol=1e-6)


def test_truncate_metrics_drops_later_and_torn_records(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1, "a": 1}\n{"step": 2, "a": 2}\n{"step": 3, "a": 3}\n{"step": 4')
  assert progress.truncate_metrics(str(path), 2) == 2
  assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]
  assert progress.truncate_metrics(str(path), 2) == 0


def test_a_failed_forced_resume_keeps_the_runs_identity(shared_data, workdir):
  before = (workdir / "run.json").read_bytes()
  with pytest.raises(errors.CheckpointError):
    experiment.train(_config(shared_data, workdir, resume="force", **{"adapter.rank": 8}),
                     str(workdir))
  assert (workdir / "run.json").read_bytes() == before
  # The run's own command still knows its run.
  assert experiment.train(_config(shared_data, workdir), str(workdir))["status"] == "complete"


def test_a_forced_resume_to_fewer_steps_is_refused(shared_data, workdir, trained):
  before = _snapshot(workdir)
  with pytest.raises(errors.RunMismatchError,
                     match=r"checkpoint at step 4, beyond this run's 2 steps.*eval.py --step 2"):
    experiment.train(_config(shared_data, workdir, num_steps=2, resume="force"), str(workdir))
  assert _snapshot(workdir) == before


def test_changed_data_of_the_same_size_is_a_mismatch(shared_data, tmp_path):
  data_dir = tmp_path / "sst2"
  shutil.copytree(shared_data / "text" / "sst2", data_dir)
  c = _config(shared_data, tmp_path / "run", **{"data.path": str(data_dir)})
  assert experiment.train(c, max_steps=2)["status"] == "paused"  # stopped at step 2 of 4
  # Every label flipped: same rows, same count, different data.
  lines = (data_dir / "train.tsv").read_text().splitlines()
  flipped = [("0" if l[0] == "1" else "1") + l[1:] for l in lines]
  os.chmod(data_dir / "train.tsv", 0o644)
  (data_dir / "train.tsv").write_text("\n".join(flipped) + "\n")
  with pytest.raises(errors.RunMismatchError, match="training data's content changed"):
    experiment.train(c)
  with pytest.raises(errors.RunMismatchError, match="training data's content changed"):
    experiment.evaluate_run(c, workdir=str(tmp_path / "run"))


def test_a_record_without_a_data_digest_still_resumes(shared_data, workdir, trained):
  record = json.loads((workdir / "run.json").read_text())
  assert record["resolved"]["data_digest"]
  del record["resolved"]["data_digest"]  # as written before the digest existed
  (workdir / "run.json").write_text(json.dumps(record))
  metrics = experiment.evaluate_run(_config(shared_data, workdir), workdir=str(workdir))
  assert metrics["step"] == STEPS


def test_checkpoints_without_run_json_need_force(shared_data, workdir, no_loading):
  os.remove(workdir / "run.json")
  with pytest.raises(errors.RunMismatchError, match="no run.json.*--config.resume=force"):
    experiment.train(_config(shared_data, workdir), str(workdir))


def test_stale_run_json_without_checkpoints_is_replaced(shared_data, tmp_path):
  c = _config(shared_data, tmp_path)
  fingerprint.commit(str(tmp_path), fingerprint.claim(c, str(tmp_path), {"num_steps": STEPS}))
  other = _config(shared_data, tmp_path, **{"optim.lr": 0.5})
  record = fingerprint.claim(other, str(tmp_path), {"num_steps": STEPS})  # nothing to protect
  fingerprint.commit(str(tmp_path), record)
  assert json.loads((tmp_path / "run.json").read_text())["config"]["optim.lr"] == 0.5


def test_same_config_on_changed_data_is_a_mismatch(shared_data, workdir, no_loading):
  c = _config(shared_data, workdir)
  with pytest.raises(errors.RunMismatchError, match=r"resolved train_examples: 64 -> 50 \(did the data"):
    fingerprint.claim(c, str(workdir), {"num_steps": STEPS, "train_examples": 50, "num_classes": 2})


# -------------------------------------------------------------------------------------- eval


def test_eval_takes_the_runs_own_training_settings(shared_data, workdir, trained, capsys):
  # The run trained with alpha 8 and 4 steps; eval is given neither override and scores the
  # checkpoint under the run's own settings, saying which it took from run.json.
  c = tiny_config(shared_data, workdir, "kind=text,method=lora",
                  **{"adapter.alpha": 64.0, "num_steps": 9})
  metrics = experiment.evaluate_run(c, workdir=str(workdir))
  assert metrics["step"] == STEPS
  assert metrics["accuracy"] == pytest.approx(trained[1]["eval"]["accuracy"])
  out = capsys.readouterr().out
  assert "evaluating with the training settings of the run" in out
  assert "adapter.alpha: 64.0 -> 8.0" in out and "num_steps: 9 -> 4" in out


def test_eval_still_refuses_a_run_it_cannot_reproduce(shared_data, workdir, no_loading):
  record = json.loads((workdir / "run.json").read_text())
  record["config"]["adapter.no_such_setting"] = 3  # written by a newer doran_jax, say
  (workdir / "run.json").write_text(json.dumps(record))
  before = _snapshot(workdir)
  with pytest.raises(errors.RunMismatchError, match=r"adapter.no_such_setting: 3 -> \(absent\)"):
    experiment.evaluate_run(_config(shared_data, workdir), workdir=str(workdir))
  assert _snapshot(workdir) == before


def test_eval_of_a_missing_workdir_creates_nothing(shared_data, tmp_path, no_loading):
  missing = tmp_path / "no_such_run"
  with pytest.raises(errors.CheckpointError, match="does not exist"):
    experiment.evaluate_run(_config(shared_data, missing), workdir=str(missing))
  assert not missing.exists()
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(errors.CheckpointError, match="has no checkpoint"):
    experiment.evaluate_run(_config(shared_data, empty), workdir=str(empty))
  assert list(empty.iterdir()) == []


def test_eval_of_the_matching_run_still_works(shared_data, workdir, trained):
  metrics = experiment.evaluate_run(_config(shared_data, workdir), workdir=str(workdir))
  assert metrics["step"] == STEPS
  assert metrics["accuracy"] == pytest.approx(trained[1]["eval"]["accuracy"])


def test_tiny_config_has_resume_auto():
  assert tiny.get_config().resume == "auto"
