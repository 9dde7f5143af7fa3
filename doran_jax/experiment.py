"""The experiment driver: train, evaluate, export, baselines and the summary (what train.py calls).

Example:
  >>> from configs import default
  >>> results = run_experiment(default.get_config(), "runs/default")
  >>> results = train(config, "runs/x")        # one method: train, evaluate, export
"""

from __future__ import annotations

import collections
import json
import os
import types
from typing import Optional

import jax
from absl import logging

from doran_jax import (checkpoint, commonsense, config_lib, errors, evaluate, fingerprint, models,
                       probe, progress, quant, sharding, trainer)
from doran_jax import run as run_lib
from doran_jax.adapters import count_params
from doran_jax.adapters import method as method_registry
from doran_jax.trainable import effective_params

log = trainer.log


def quiet_third_party_logs() -> None:
  """Keeps the console to our progress lines: transformers' tokenizer chatter and absl's info
  lines go to warnings and errors only."""
  import transformers  # for its logger only; imported by the tokenizer anyway
  transformers.logging.set_verbosity_error()
  logging.set_verbosity(logging.WARNING)


def evaluate_state(run, trainable, adapter_cfg=None) -> dict:
  """Eval-split metrics of a trainable tree with the merged (train=False) weights, sharded on
  the run's mesh."""
  adapter_cfg = adapter_cfg or run.adapter_cfg
  # A quantised base is evaluated in factored form (no full-precision W').
  params, apply_fn = evaluate.params_and_apply(run.backbone.apply, run.frozen, trainable, adapter_cfg)
  predict = evaluate.make_predict_fn(apply_fn, run.mesh)
  return evaluate.evaluate(predict, run.backbone.task, params, run.eval_data,
                           run.config.eval_batch_size, mesh=run.mesh)


def train(config, workdir: Optional[str] = None, *, run=None, max_steps: Optional[int] = None) -> dict:
  """Trains (with checkpoints/resume), evaluates, exports. Returns the results dict.

  Its 'state' is the final TrainState and 'history' the per-step records (neither goes to
  results.json). `max_steps` pauses after that many steps (status 'paused').

  Example:
    >>> results = train(sst2.get_config("method=dora"), "runs/sst2_dora")
    >>> results["eval"]["accuracy"]
  """
  workdir = workdir or config.workdir
  finished = _finished_results(config, workdir, validate=run is None)
  if finished is not None:
    return finished
  run = run or run_lib.setup(config)
  out = trainer.fit(run, workdir, max_steps=max_steps)
  state = out["state"]
  if out["status"] != "done":
    return out
  results = {**out, "method": run.adapter_cfg.method, "steps": run.num_steps,
             "lr": float(run.config.optim.lr),
             "trainable_params": count_params(state.trainable),
             "adapter_params": count_params(state.trainable["adapters"])}
  if run.training.summary is not None:
    summary = run.training.summary(jax.device_get(state.trainable["adapters"]))
    log(f"{run.adapter_cfg.method}: " + json.dumps(summary))
    results.update(summary)
  results["eval"] = evaluate_state(run, state.trainable)
  if run.backbone.task == "causal_lm" and config.generate.enabled:
    results["eval"]["commonsense"] = generation_eval(run, state, config.generate)
  log(f"eval ({run.adapter_cfg.method}): " + json.dumps(results["eval"]))
  with progress.MetricWriter(workdir, total_steps=run.num_steps, progress_bar=False,
                             tensorboard=bool(config.tensorboard),
                             enabled=jax.process_index() == 0) as writer:
    writer.write(run.num_steps, progress.flatten_metrics(results["eval"], "eval/"))
  export(run, state, workdir)
  _write_results(workdir, results)
  return results


def _finished_results(config, workdir: str, *, validate: bool = True) -> Optional[dict]:
  """Checks the config and the workdir's run identity before anything loads; for a run that
  already finished in `workdir`, its saved results (status 'complete'), else None."""
  if validate:
    config_lib.validate(config)
  results = fingerprint.completed(workdir, fingerprint.check(config, workdir))
  if results is None:
    return None
  log(f"this run is complete: {workdir} holds its final checkpoint (step {results['steps']}) and "
      f"{os.path.join(workdir, fingerprint.RESULTS)}; nothing was retrained or rewritten. For "
      "another run use a new --config.workdir; to re-score the checkpoint use eval.py.")
  return {**results, "status": "complete"}


def _write_results(workdir: str, results: dict) -> None:
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "results.json"), "w") as f:
      json.dump({k: v for k, v in results.items() if k not in ("history", "state")}, f, indent=2)


def generation_eval(run, state, generate) -> dict:
  """Commonsense accuracy: greedy generation with the merged weights, answer word extracted."""
  limit = int(generate.limit_per_task or 0)
  seen, examples = collections.Counter(), []
  for example in run.eval_data.examples or []:
    seen[example["task"]] += 1
    if not limit or seen[example["task"]] <= limit:
      examples.append(example)
  params, apply_fn = evaluate.params_and_apply(run.backbone.apply, run.frozen, state.trainable,
                                               run.adapter_cfg)
  backbone = run.backbone
  if quant.any_quantized(run.frozen):   # generate with the factored form
    backbone = types.SimpleNamespace(task=backbone.task, config=backbone.config, apply=apply_fn)
  generate_fn = commonsense.make_generate_fn(backbone, params, run.tokenizer,
                                             max_new_tokens=int(generate.max_new_tokens))
  return commonsense.evaluate_commonsense(generate_fn, examples, None,
                                          batch_size=run.config.eval_batch_size)


def export(run, state, workdir: str) -> None:
  """Adapter-only export always; with config.export.merged also the backbone with the adapters
  folded in, in transformers' PyTorch names and layouts (models.save_pretrained)."""
  if jax.process_index() != 0:
    return
  extra = {"model": run.config.model.to_dict(), "head": run.config.head, "step": int(state.step)}
  checkpoint.export_adapters(os.path.join(workdir, "export", "adapters"), state.trainable,
                             run.adapter_cfg, extra)
  if run.config.export.merged:
    # A quantised base is dequantised for the merged export (its dtype: model.param_dtype).
    merged = jax.jit(lambda f, t: effective_params(quant.dequantize_params(f), t, run.adapter_cfg,
                                                   train=False))(run.frozen, state.trainable)
    models.save_pretrained(run.backbone, merged, os.path.join(workdir, "export", "merged"),
                           tokenizer=run.tokenizer)


def run_experiment(config, workdir: Optional[str] = None) -> dict:
  """train() plus the configured baselines ('majority', 'frozen', 'linear_probe'), with a summary
  table printed.

  The frozen baseline trains only the task head for the same number of steps in
  `<workdir>/baseline_frozen`, at its own lr (optim.lr_by_method['frozen'] unless lr is set);
  the linear probe fits a logistic regression on frozen features to convergence (no lr).
  """
  workdir = workdir or config.workdir
  finished = _finished_results(config, workdir)
  if finished is not None:
    return finished
  run = run_lib.setup(config)
  results = train(config, workdir, run=run)
  if results["status"] != "done":
    return results
  baselines = {}
  if "majority" in config.baselines:
    baselines["majority"] = evaluate.majority_baseline(run.train_data, run.eval_data)
  method = method_registry.get(config.adapter.method)
  already_head_only = not method.has_adapters and not method.trains_backbone
  if "frozen" in config.baselines and not already_head_only:
    frozen_config = config.copy_and_resolve_references()
    with frozen_config.unlocked():
      frozen_config.adapter.method = method_registry.get("frozen").name
      frozen_config.num_steps = run.num_steps
      # The baseline at its own lr: an lr given for the method is not the head's.
      table = frozen_config.optim.get("lr_by_method", None) or {}
      if "frozen" in table:
        frozen_config.optim.lr = float(table["frozen"])
    frozen_results = train(frozen_config, os.path.join(workdir, "baseline_frozen"))
    baselines["frozen"] = {**frozen_results["eval"], "train_minutes": frozen_results["train_minutes"],
                           "trainable_params": frozen_results["trainable_params"],
                           "lr": frozen_results["lr"]}
  if "linear_probe" in config.baselines:
    baselines["linear_probe"] = linear_probe(config, run)
  results["baselines"] = baselines
  log(summary_table(results))
  _write_results(workdir, results)
  return results


def linear_probe(config, run) -> dict:
  """The 'linear_probe' baseline: logistic regression on the frozen backbone's mean-pooled last
  hidden states (the same checkpoint loaded as task 'features'), fitted with full-batch L-BFGS."""
  if run.backbone.task != "classification":
    raise ValueError(f"the linear_probe baseline needs a text classification task, not "
                     f"{run.backbone.task!r}; remove it from config.baselines.")
  features_config = config.copy_and_resolve_references()
  with features_config.unlocked():
    features_config.model.task = "features"
  features = run_lib.load_model(features_config)
  out = probe.linear_probe_baseline(features.apply, features.params, run.train_data,
                                    run.eval_data, int(config.eval_batch_size))
  log("baseline linear_probe: " + json.dumps(out))
  return {**out, "train_minutes": 0.0}


def summary_table(results: dict) -> str:
  """Markdown table of the run and its baselines."""
  rows = [(results["method"], results["eval"], results["trainable_params"], results["train_minutes"])]
  for name, r in results.get("baselines", {}).items():
    rows.append((f"baseline: {name}", r, r.get("trainable_params", 0), r.get("train_minutes", 0.0)))
  keys = [k for k in ("accuracy", "macro_f1", "mcc", "eval_loss", "token_accuracy") if k in results["eval"]]
  lines = ["| run | " + " | ".join(keys) + " | trainable params | train min |",
           "|---" * (len(keys) + 3) + "|"]
  for name, r, n, minutes in rows:
    lines.append(f"| {name} | " + " | ".join(f"{r[k]:.4f}" if k in r else "—" for k in keys)
                 + f" | {n:,} | {minutes:.1f} |")
  return "\n".join(lines)


def evaluate_run(config, *, workdir=None, adapters_dir=None, step=None, save=True) -> dict:
  """Evaluates a checkpoint (the latest, or `step`) or an adapter-only export on the eval split.

  The metrics get 'step' and 'source' keys and, with `save`, are written as JSON next to what
  was evaluated: <workdir>/eval_step<N>.json, or <adapters_dir>/eval.json.

  Example:
    >>> from configs import sst2
    >>> evaluate_run(sst2.get_config("method=dora"), workdir="runs/sst2")["accuracy"]
  """
  config_lib.validate(config)
  if adapters_dir:
    if step is not None:
      raise errors.ConfigError("step selects a checkpoint in a workdir; an adapter export has no "
                               "steps.")
    if not os.path.isfile(os.path.join(adapters_dir, "adapter_config.json")):
      raise errors.CheckpointError(
          f"{adapters_dir!r} is not an adapter export (no adapter_config.json); pass the "
          "<workdir>/export/adapters folder a training run wrote.")
    run = run_lib.setup(config)
    trainable, cfg, extra = checkpoint.load_adapters(adapters_dir)
    if cfg.method != run.adapter_cfg.method:
      raise errors.ConfigError(
          f"export {adapters_dir} holds {cfg.method!r} adapters but the config says "
          f"{run.adapter_cfg.method!r}; pass the matching config.")
    source, out_path = adapters_dir, os.path.join(adapters_dir, "eval.json")
    step = extra.get("step")
  else:
    workdir = workdir or config.workdir
    # Never create anything under a workdir that is not a run (orbax would make checkpoints/).
    if not os.path.isdir(workdir):
      raise errors.CheckpointError(
          f"workdir {workdir!r} does not exist; pass the run's folder with --workdir (or "
          "--config.workdir), or an adapter export with --adapters.")
    if not fingerprint.checkpoint_steps(workdir):
      raise errors.CheckpointError(
          f"workdir {workdir!r} has no checkpoint in {os.path.join(workdir, 'checkpoints')}; "
          "train it first (train.py) or pass an adapter export with --adapters.")
    record = fingerprint.check(config, workdir, purpose="eval")
    run = run_lib.setup(config)
    if record is not None and not record["differences"]:
      diffs = fingerprint.differences(record.get("resolved", {}),
                                      fingerprint.resolved(run.num_steps, run.train_data))
      if diffs and config.get("resume", "auto") != "force":
        raise errors.RunMismatchError(
            f"workdir {workdir} was trained on other data than this config loads ({'; '.join(diffs)}); "
            "evaluate with the data it was trained on, or pass --config.resume=force.")
    mngr = checkpoint.manager(os.path.join(workdir, "checkpoints"))
    state, _ = checkpoint.restore(mngr, sharding.abstract(run.state), step)
    mngr.close()
    trainable, cfg, step = state.trainable, run.adapter_cfg, int(state.step)
    source, out_path = workdir, os.path.join(workdir, f"eval_step{step}.json")
  metrics = {"step": step, "source": source, **evaluate_state(run, trainable, cfg)}
  if save and jax.process_index() == 0:
    with open(out_path, "w") as f:
      json.dump(metrics, f, indent=2)
  return metrics
