"""End-to-end training on tiny configs: each task type, exact resume, SIGTERM, NaN stop, exports."""

import copy
import json
import logging
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import tiny
from doran_jax import checkpoint, config_lib, errors, evaluate, experiment, trainer
from doran_jax import run as run_lib
from doran_jax.trainable import merge_params

REPO = pathlib.Path(__file__).resolve().parents[1]


def tiny_config(shared_data, workdir, arg="", **overrides):
  c = tiny.get_config(arg or None)
  with c.unlocked():
    c.workdir = str(workdir)
    if c.data.source == "tsv":
      c.data.path = str(shared_data / "text" / "sst2")
    elif c.data.source == "commonsense":
      c.data.path = str(shared_data / "commonsense")
    for key, value in overrides.items():
      config_lib.set_path(c, key, value)
  return c


@pytest.mark.parametrize("method", ["lora", "dora", "doran", "full", "frozen"])
def test_text_classification_trains_each_method(shared_data, tmp_path, method):
  c = tiny_config(shared_data, tmp_path, f"kind=text,method={method}", num_steps=2)
  results = experiment.train(c)
  assert results["status"] == "done"
  assert len(results["history"]) == 2
  assert all(np.isfinite(h["loss"]) for h in results["history"])
  assert 0.0 <= results["eval"]["accuracy"] <= 1.0 and results["eval"]["n"] == 32
  assert (tmp_path / "export" / "adapters" / "adapter_config.json").exists()
  trainable, cfg, _ = checkpoint.load_adapters(str(tmp_path / "export" / "adapters"))
  assert cfg.method == method
  if method in ("full", "frozen"):
    assert trainable["adapters"]["targets"] == {}


def test_factored_mode_trains_like_merged(shared_data, tmp_path):
  losses = {}
  for mode in ("merged", "factored"):
    c = tiny_config(shared_data, tmp_path / mode, "kind=text,method=dora", num_steps=3,
                    **{"adapter.mode": mode})
    losses[mode] = [h["loss"] for h in experiment.train(c)["history"]]
  np.testing.assert_allclose(losses["factored"], losses["merged"], rtol=1e-5)


def test_causal_lm_on_real_commonsense_files(shared_data, tmp_path):
  c = tiny_config(shared_data, tmp_path, "kind=causal,method=dora", num_steps=2)
  results = experiment.train(c)
  assert all(np.isfinite(h["loss"]) for h in results["history"])
  assert np.isfinite(results["eval"]["eval_loss"]) and 0 <= results["eval"]["token_accuracy"] <= 1
  generated = results["eval"]["commonsense"]  # greedy generation + answer extraction ran
  assert generated["n"] == 8 and 0.0 <= generated["accuracy"] <= 1.0


def test_image_classification_under_tfds_mock(tmp_path, shared_data):
  import tensorflow_datasets as tfds
  c = tiny_config(shared_data, tmp_path, "kind=image,method=doran", num_steps=2)
  with tfds.testing.mock_data(num_examples=96, policy=tfds.testing.MockPolicy.USE_CODE):
    results = experiment.train(c)
  assert all(np.isfinite(h["loss"]) for h in results["history"])
  assert results["eval"]["n"] == 32


def test_gradient_accumulation_matches_one_big_batch(shared_data, tmp_path):
  losses = {}
  for accum in (1, 2):
    c = tiny_config(shared_data, tmp_path / str(accum), "kind=text,method=lora", num_steps=3,
                    **{"optim.accum_steps": accum, "model.config_overrides": {
                        "vocab_size": 30522, "hidden_dropout_prob": 0.0,
                        "attention_probs_dropout_prob": 0.0}})
    losses[accum] = [h["loss"] for h in experiment.train(c)["history"]]
  np.testing.assert_allclose(losses[2], losses[1], rtol=1e-4)


def test_exact_resume_equals_uninterrupted_run(shared_data, tmp_path):
  straight = tiny_config(shared_data, tmp_path / "straight", "kind=text,method=doran", num_steps=6)
  full = [h["loss"] for h in experiment.train(straight)["history"]]
  interrupted = tiny_config(shared_data, tmp_path / "resumed", "kind=text,method=doran", num_steps=6)
  first = experiment.train(interrupted, max_steps=3)
  assert first["status"] == "paused"
  part1 = [h["loss"] for h in first["history"]]
  part2 = [h["loss"] for h in experiment.train(interrupted)["history"]]
  assert len(part2) == 3  # resumed at step 3, not from scratch
  np.testing.assert_array_equal(np.array(part1 + part2), np.array(full))


def test_restore_with_other_rank_is_a_clear_error(shared_data, tmp_path):
  experiment.train(tiny_config(shared_data, tmp_path, "kind=text,method=lora,rank=2", num_steps=2))
  with pytest.raises(ValueError, match="does not match this run"):
    experiment.train(tiny_config(shared_data, tmp_path, "kind=text,method=lora,rank=4", num_steps=4))


def _nan_from_step_5(run):
  """`run` (tiny BERT) whose batches from step 5 on hit a NaN embedding row."""
  clean_batch = run.train_data.batch

  def poisoned(step, batch_size, **kw):
    batch = clean_batch(step, batch_size, **kw)
    if step >= 4:  # token 1 ([unused0], never in the data) gets a NaN embedding below
      batch["input_ids"] = batch["input_ids"].copy()
      batch["input_ids"][:, 1] = 1
    return batch

  run.train_data.batch = poisoned
  run.frozen["bert"]["embeddings"]["word_embeddings"]["embedding"] = (
      run.frozen["bert"]["embeddings"]["word_embeddings"]["embedding"].at[1].set(np.nan))
  return run


def test_nan_loss_stops_and_keeps_last_good_checkpoint(shared_data, tmp_path):
  c = tiny_config(shared_data, tmp_path, "kind=text,method=dora", num_steps=8)
  run = _nan_from_step_5(run_lib.setup(c))
  with pytest.raises(trainer.NonFiniteLossError, match=r"at step 5 .*Last good checkpoint: step 4"):
    experiment.train(c, run=run)
  mngr = checkpoint.manager(str(tmp_path / "checkpoints"))
  assert mngr.latest_step() == 4
  abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), run.state)
  state, meta = checkpoint.restore(mngr, abstract)
  assert int(state.step) == 4 and meta["data_step"] == 4
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(state.trainable))


def test_sigterm_saves_and_exits_with_the_preempted_code(shared_data, tmp_path):
  cmd = [sys.executable, "train.py", "--config", "configs/tiny.py:kind=text,method=lora",
         f"--config.workdir={tmp_path}", f"--config.data.path={shared_data / 'text' / 'sst2'}",
         "--config.num_steps=100000", "--config.checkpoint.every=100000"]
  env = {**os.environ, "PYTHONUNBUFFERED": "1"}
  proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=env)
  lines = []
  for line in proc.stdout:
    lines.append(line)
    if line.startswith("step 2/"):
      proc.send_signal(signal.SIGTERM)
      break
  out, _ = proc.communicate(timeout=300)
  text = "".join(lines) + out
  # A scheduler must tell a preempted run from a finished one (0): 143 = 128 + SIGTERM.
  assert proc.returncode == 143, text
  assert errors.PREEMPTED_EXIT_CODE == 143
  assert "preempted: checkpoint at step" in text
  step = checkpoint.manager(str(tmp_path / "checkpoints")).latest_step()
  assert step is not None and step >= 2


def test_merged_export_loads_in_pytorch_transformers(shared_data, tmp_path):
  import torch
  import transformers
  c = tiny_config(shared_data, tmp_path, "kind=text,method=doran", num_steps=2,
                  **{"export.merged": True})
  run = run_lib.setup(c)
  state = experiment.train(c, run=run)["state"]
  theirs_model = transformers.AutoModelForSequenceClassification.from_pretrained(
      tmp_path / "export" / "merged")
  theirs_model.eval()
  batch = run.eval_data.batch(0, 8, seed=0)
  inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
  merged = evaluate.merged_params(run.frozen, state.trainable, run.adapter_cfg)
  ours = run.backbone.apply(merged, inputs)
  with torch.no_grad():
    theirs = theirs_model(**{k: torch.tensor(v).long() for k, v in inputs.items()}).logits
  np.testing.assert_allclose(theirs.numpy(), np.asarray(ours), rtol=1e-5, atol=1e-5)
  # The adapters moved the weights: the export is not the untouched backbone.
  base = run.backbone.apply(merge_params(run.frozen, state.trainable["params"]), inputs)
  assert np.abs(np.asarray(base) - np.asarray(ours)).max() > 1e-7
  # The tokenizer goes with it, so the folder serves as it is.
  assert (tmp_path / "export" / "merged" / "tokenizer.json").exists()


def test_bad_inputs_are_clear_errors(shared_data, tmp_path):
  with pytest.raises(ValueError, match="unknown method 'dorra'"):
    run_lib.setup(tiny_config(shared_data, tmp_path, "kind=text", **{"adapter.method": "dorra"}))
  with pytest.raises(ValueError, match="matches no parameter"):
    run_lib.setup(tiny_config(shared_data, tmp_path, "kind=text",
                              **{"adapter.targets": r".*/qkv/kernel"}))
  with pytest.raises(ValueError, match="larger than min"):
    run_lib.setup(tiny_config(shared_data, tmp_path, "kind=text,rank=64"))
  with pytest.raises(ValueError, match="unknown config argument 'rnak'"):
    tiny.get_config("rnak=4")


def test_nonfinite_message_names_what_became_nonfinite_and_the_suspects(tmp_path):
  c = tiny.get_config("kind=text")
  with c.unlocked():
    c.optim.lr = float("nan")
  update_only = {"loss": 0.711, "grad_norm": 0.5, "update_norm": float("nan")}
  msg = trainer.nonfinite_message(update_only, 3, c, 2, "/w/checkpoints")
  assert msg.startswith("non-finite update norm at step 3 (loss 0.711, gradient norm 0.5")
  assert "loss became" not in msg and "non-finite loss" not in msg
  assert "Last good checkpoint: step 2 in /w/checkpoints." in msg
  assert "Suspicious config: optim.lr=nan" in msg and "the optimizer made the update" in msg
  assert "clip_norm" not in msg  # it is on (1.0): no advice to enable it
  c = tiny.get_config("kind=text")
  with c.unlocked():
    c.optim.clip_norm = 0.0
  all_bad = {"loss": float("nan"), "grad_norm": float("nan"), "update_norm": float("inf")}
  msg = trainer.nonfinite_message(all_bad, 5, c, None, "/w/checkpoints")
  assert msg.startswith("non-finite loss, gradient norm, update norm at step 5")
  assert "No checkpoint was saved yet." in msg and "Suspicious config" not in msg
  assert "Check the data" in msg and "--config.optim.clip_norm=1.0" in msg
  grad_only = {"loss": 0.7, "grad_norm": float("inf"), "update_norm": float("nan")}
  assert "its gradient was not" in trainer.nonfinite_message(grad_only, 1, c, None, "/w")


def test_nan_lr_is_named_as_the_cause(shared_data, tmp_path):
  run = run_lib.with_optimizer(
      run_lib.setup(tiny_config(shared_data, tmp_path, "kind=text,method=lora")), lr=float("nan"))
  with pytest.raises(trainer.NonFiniteLossError) as info:
    trainer.fit(run, str(tmp_path))
  msg = str(info.value)
  assert msg.startswith("non-finite update norm at step 1 (loss 0.69")  # the loss was fine
  assert "Suspicious config: optim.lr=nan" in msg and "clip_norm" not in msg
  assert isinstance(info.value, FloatingPointError) and isinstance(info.value, errors.UserError)


def _interrupting(run, at_step, times=1):
  """`run` whose data loader sends this process SIGINT (Ctrl-C) `times` times at `at_step`."""
  clean = run.train_data.batch

  def batch(step, batch_size, **kw):
    if step == at_step:
      for _ in range(times):
        os.kill(os.getpid(), signal.SIGINT)
    return clean(step, batch_size, **kw)

  data = copy.copy(run.train_data)
  data.batch = batch
  return run.replace(train_data=data)


def test_ctrl_c_saves_and_a_rerun_resumes(shared_data, tmp_path, capsys):
  c = tiny_config(shared_data, tmp_path, "kind=text,method=lora", num_steps=6,
                  **{"checkpoint.every": 100})
  run = run_lib.setup(c)
  # Whatever the process had (a shell launching it in the background sets SIG_IGN) comes back.
  handler_before = signal.getsignal(signal.SIGINT)
  out = trainer.fit(_interrupting(run, at_step=2), str(tmp_path))
  assert out["status"] == "preempted" and out["step"] == 3
  text = capsys.readouterr().out
  assert "Ctrl-C received: saving a checkpoint" in text and "preempted: checkpoint at step 3" in text
  assert signal.getsignal(signal.SIGINT) is handler_before  # handler given back
  assert checkpoint.manager(str(tmp_path / "checkpoints")).all_steps() == [3]
  rest = trainer.fit(run, str(tmp_path))
  assert rest["status"] == "done" and [h["step"] for h in rest["history"]] == [4, 5, 6]
  assert "resumed from step 3" in capsys.readouterr().out


def test_second_ctrl_c_aborts_without_saving(shared_data, tmp_path):
  c = tiny_config(shared_data, tmp_path, "kind=text,method=lora", num_steps=6,
                  **{"checkpoint.every": 100})
  with pytest.raises(KeyboardInterrupt):
    trainer.fit(_interrupting(run_lib.setup(c), at_step=1, times=2), str(tmp_path))
  assert checkpoint.manager(str(tmp_path / "checkpoints")).all_steps() == []


def _compiled(records, prefix="Finished XLA compilation of "):
  return [r.getMessage()[len(prefix):].split(" in ")[0] for r in records
          if r.getMessage().startswith(prefix)]


def test_train_step_compiles_once_also_after_resume(shared_data, tmp_path, caplog, capsys):
  c = tiny_config(shared_data, tmp_path, "kind=text,method=doran", num_steps=3)
  with jax.log_compiles(), caplog.at_level(logging.WARNING):
    run = run_lib.setup(c)
  # Whole-tree initialisers, not one compile per leaf: the model init, the keys, the adapters,
  # the optimizer state (and jax's own seed staging), each once.
  in_setup = _compiled(caplog.records)
  assert len(in_setup) <= 6 and len(set(in_setup)) == len(in_setup), in_setup
  caplog.clear()
  with jax.log_compiles(), caplog.at_level(logging.WARNING):
    first = trainer.fit(run, str(tmp_path), max_steps=2)   # steps 1-2, checkpoint at 2
    rest = trainer.fit(run, str(tmp_path))                 # restored, step 3
  assert first["status"] == "paused" and [h["step"] for h in rest["history"]] == [3]
  compiles = _compiled(caplog.records)
  assert compiles.count("jit(step)") == 1, compiles
  assert run.train_step._cache_size() == 1
  assert not [r for r in caplog.records if "compiled again" in r.getMessage()]
  assert re.search(r"first step after [\d.]+ s \(compile [\d.]+ s\)", capsys.readouterr().out)


def _counting_device_get(monkeypatch):
  calls = []
  real = jax.device_get

  def counted(x):
    calls.append(x)
    return real(x)

  monkeypatch.setattr(trainer.jax, "device_get", counted)
  return calls


def test_metrics_stay_on_device_between_log_points(shared_data, tmp_path, monkeypatch):
  # Same run, fetched every step and every 4 steps: the same records, far fewer host syncs.
  every_step = tiny_config(shared_data, tmp_path / "a", "kind=text,method=dora", num_steps=9,
                           **{"checkpoint.every": 100})
  every_4 = tiny_config(shared_data, tmp_path / "b", "kind=text,method=dora", num_steps=9,
                        log_every=4, **{"checkpoint.every": 100})
  calls = _counting_device_get(monkeypatch)
  a = trainer.fit(run_lib.setup(every_step), str(tmp_path / "a"))
  syncs_a = len(calls)
  calls.clear()
  b = trainer.fit(run_lib.setup(every_4), str(tmp_path / "b"))
  # One fetch per step against fetches at steps 1, 4, 8 and 9 (the end); setup's own fetches
  # are the same in both.
  assert syncs_a - len(calls) == 9 - 4, (syncs_a, len(calls))
  assert a["history"] == b["history"]
  assert [h["step"] for h in b["history"]] == list(range(1, 10))

  def lines(d):
    return [json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()
            if '"train/loss"' in x]

  drop = ("train/examples_per_s", "time")
  assert ([{k: v for k, v in r.items() if k not in drop} for r in lines("a")]
          == [{k: v for k, v in r.items() if k not in drop} for r in lines("b")])


def test_nan_between_log_points_is_caught_before_the_next_save(shared_data, tmp_path):
  # Fetched at steps 1, 3, 4, 6, 8; saved at 4 and 8. The NaN at step 5 surfaces at the fetch
  # of step 6, names step 5, and no checkpoint after step 4 is written.
  c = tiny_config(shared_data, tmp_path, "kind=text,method=dora", num_steps=8, log_every=3,
                  **{"checkpoint.every": 4})
  run = _nan_from_step_5(run_lib.setup(c))
  with pytest.raises(trainer.NonFiniteLossError, match=r"at step 5 .*Last good checkpoint: step 4"):
    trainer.fit(run, str(tmp_path))
  assert checkpoint.manager(str(tmp_path / "checkpoints")).all_steps() == [4]
  steps = [json.loads(x).get("step") for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert 5 not in steps and 6 not in steps  # only what was checked finite is recorded


def test_ctrl_c_between_log_points_stops_at_the_next_step(shared_data, tmp_path, capsys):
  c = tiny_config(shared_data, tmp_path, "kind=text,method=lora", num_steps=20, log_every=100,
                  **{"checkpoint.every": 100})
  out = trainer.fit(_interrupting(run_lib.setup(c), at_step=5), str(tmp_path))
  assert out["status"] == "preempted" and out["step"] == 6
  assert [h["step"] for h in out["history"]] == list(range(1, 7))
  assert checkpoint.manager(str(tmp_path / "checkpoints")).all_steps() == [6]
