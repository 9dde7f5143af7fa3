"""The experiment driver: train, evaluate, export, baselines and the summary (what train.py calls).

Example:
  >>> from configs import default
  >>> results = run_experiment(default.get_config(), "runs/default")
  >>> results = train(config, "runs/x")        # one method: train, evaluate, export
"""

from __future__ import annotations

import collections
import json
import time
import types
from typing import Optional

import jax
from absl import logging

from doran_jax import (checkpoint, commonsense, config_lib, errors, evaluate, files, fingerprint,
                       models, paths, probe, progress, quant, scoring, sharding, trainer,
                       workdir_lock)
from doran_jax import run as run_lib
from doran_jax.adapters import count_params
from doran_jax.adapters import method as method_registry
from doran_jax.models.generate import cache_spec, eos_ids, generate as generate_tokens
from doran_jax.trainable import effective_params, merge_params

log = trainer.log


def quiet_third_party_logs() -> None:
  """Keeps the console to our progress lines: transformers' tokenizer chatter and absl's info
  lines go to warnings and errors only."""
  import transformers  # for its logger only; imported by the tokenizer anyway
  transformers.logging.set_verbosity_error()
  logging.set_verbosity(logging.WARNING)


def evaluate_state(run, trainable, adapter_cfg=None) -> dict:
  """Eval-split metrics of a trainable tree with the merged (train=False) weights, sharded on
  the run's mesh; for a causal LM also the commonsense scores config.generate asks for."""
  adapter_cfg = adapter_cfg or run.adapter_cfg
  # A quantised base is evaluated in factored form (no full-precision W').
  params, apply_fn = evaluate.params_and_apply(run.backbone.apply, run.frozen, trainable, adapter_cfg)
  return evaluate_params(run, params, apply_fn)


def evaluate_params(run, params, apply_fn) -> dict:
  """`evaluate.evaluate` on the eval split, plus `lm_eval` for a causal LM."""
  predict = evaluate.make_predict_fn(apply_fn, run.mesh)
  metrics = evaluate.evaluate(predict, run.backbone.task, params, run.eval_data,
                              run.config.eval_batch_size, mesh=run.mesh)
  if run.backbone.task == "causal_lm":
    metrics.update(lm_eval(run, params, apply_fn))
  return metrics


def zero_shot(run) -> dict:
  """The 'zero_shot' baseline: the causal LM as loaded (no adapters), on the same evaluation."""
  params = merge_params(run.frozen, run.state.trainable["params"])
  log(f"baseline zero_shot: evaluating {run.config.model.name} as loaded")
  start = time.time()
  out = evaluate_params(run, params, run.backbone.apply)
  log("baseline zero_shot: " + json.dumps(out))
  return {**out, "trainable_params": 0, "train_minutes": 0.0,
          "eval_minutes": (time.time() - start) / 60}


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
  # One writer per workdir from the first write (run.json) to the last (results.json).
  with workdir_lock.held(workdir, enabled=jax.process_index() == 0):
    return _train(config, workdir, run or run_lib.setup(config), max_steps)


def _train(config, workdir: str, run, max_steps: Optional[int]) -> dict:
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
    # Before any JAX call (the workdir lock asks for the process index).
    sharding.maybe_initialize_distributed(config.distributed)
  paths.for_orbax(trainer.checkpoint_dir(workdir))  # memory:// etc.: refused before any write
  results = fingerprint.completed(workdir, fingerprint.check(config, workdir))
  if results is None:
    return None
  log(f"this run is complete: {workdir} holds its final checkpoint (step {results['steps']}) and "
      f"{paths.join(workdir, fingerprint.RESULTS)}; nothing was retrained or rewritten. For "
      "another run use a new --config.workdir; to re-score the checkpoint use eval.py.")
  return {**results, "status": "complete"}


def _write_results(workdir: str, results: dict) -> None:
  if jax.process_index() == 0:
    files.write_json(paths.join(workdir, "results.json"),
                     {k: v for k, v in results.items() if k not in ("history", "state")})


def _eval_records(run, limit: int) -> list:
  """The eval split's commonsense records (none for other sources), the first `limit` of each
  task (0: all)."""
  if run.config.data.source != "commonsense":
    return []
  seen, records = collections.Counter(), []
  for record in run.eval_data.examples or []:
    seen[record["task"]] += 1
    if not limit or seen[record["task"]] <= limit:
      records.append(record)
  return records


def lm_eval(run, params, apply_fn) -> dict:
  """Commonsense accuracy as config.generate asks: 'commonsense' from greedy generation (answer
  word extracted), 'multiple_choice' from log-likelihoods (accuracy and accuracy_norm)."""
  gen = run.config.generate
  records = _eval_records(run, int(gen.limit_per_task or 0))
  out = {}
  if not records or not (gen.enabled or gen.get("multiple_choice", False)):
    return out
  backbone = types.SimpleNamespace(task=run.backbone.task, config=run.backbone.config,
                                   apply=apply_fn)
  tasks = len({r["task"] for r in records})
  if gen.enabled:
    start = time.time()
    generate_fn = commonsense.make_generate_fn(backbone, params, run.tokenizer,
                                               max_new_tokens=int(gen.max_new_tokens))
    out["commonsense"] = commonsense.evaluate_commonsense(generate_fn, records, None,
                                                          batch_size=run.config.eval_batch_size)
    log(f"generation: {len(records)} questions of {tasks} tasks, accuracy "
        f"{out['commonsense']['accuracy']:.4f} ({time.time() - start:.0f} s)")
  if gen.get("multiple_choice", False):
    start = time.time()
    ll_fn = scoring.make_loglikelihood_fn(
        apply_fn, params, pad_id=run.tokenizer.pad_token_id or 0,
        # GPT-2 names its position count n_positions.
        max_length=(run.backbone.config.get("max_position_embeddings")
                    or run.backbone.config.get("n_positions")),
        batch_size=int(run.config.eval_batch_size), cache=cache_spec(run.backbone))
    out["multiple_choice"] = scoring.multiple_choice(ll_fn, run.tokenizer,
                                                     scoring.commonsense_questions(records))
    log(f"multiple choice: {len(records)} questions of {tasks} tasks, accuracy "
        f"{out['multiple_choice']['accuracy']:.4f} ({time.time() - start:.0f} s)")
  return out


def export(run, state, workdir: str) -> None:
  """Adapter-only export always; with config.export.merged also the backbone with the adapters
  folded in, in transformers' PyTorch names and layouts (models.save_pretrained)."""
  if jax.process_index() != 0:
    return
  extra = {"model": run.config.model.to_dict(), "head": run.config.head, "step": int(state.step)}
  checkpoint.export_adapters(paths.join(workdir, "export", "adapters"), state.trainable,
                             run.adapter_cfg, extra)
  if run.config.export.merged:
    # A quantised base is dequantised for the merged export (its dtype: model.param_dtype).
    merged = jax.jit(lambda f, t: effective_params(quant.dequantize_params(f), t, run.adapter_cfg,
                                                   train=False))(run.frozen, state.trainable)
    # export/merged belongs to this run (its workdir identity was checked): a re-export of the
    # same run (resume=force to more steps) replaces it. Symlinks and the base's own folder
    # stay refused.
    models.save_pretrained(run.backbone, merged, paths.join(workdir, "export", "merged"),
                           tokenizer=run.tokenizer, overwrite=True)


def run_experiment(config, workdir: Optional[str] = None) -> dict:
  """train() plus the configured baselines ('majority', 'frozen', 'linear_probe'; 'zero_shot' for a
  causal LM), with a summary table printed.

  The frozen baseline trains only the task head for the same number of steps in
  `<workdir>/baseline_frozen`, at its own lr (optim.lr_by_method['frozen'] unless lr is set);
  the linear probe fits a logistic regression on frozen features to convergence (no lr).
  """
  workdir = workdir or config.workdir
  finished = _finished_results(config, workdir)
  if finished is not None:
    return finished
  with workdir_lock.held(workdir, enabled=jax.process_index() == 0):
    return _run_experiment(config, workdir)


def _run_experiment(config, workdir: str) -> dict:
  run = run_lib.setup(config)
  baselines = {}
  if "zero_shot" in config.baselines:
    # Before training: the train step donates the initial state's buffers.
    baselines["zero_shot"] = zero_shot(run)
  results = train(config, workdir, run=run)
  if results["status"] != "done":
    return results
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
    frozen_results = train(frozen_config, paths.join(workdir, "baseline_frozen"))
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


# Summary columns: (name, key path into the eval metrics).
_SUMMARY_KEYS = (("accuracy", ("accuracy",)), ("macro_f1", ("macro_f1",)), ("mcc", ("mcc",)),
                 ("mc accuracy", ("multiple_choice", "accuracy")),
                 ("mc accuracy_norm", ("multiple_choice", "accuracy_norm")),
                 ("generation accuracy", ("commonsense", "accuracy")),
                 ("eval_loss", ("eval_loss",)), ("perplexity", ("perplexity",)),
                 ("token_accuracy", ("token_accuracy",)))


def _lookup(metrics: dict, path: tuple):
  for key in path:
    if not isinstance(metrics, dict) or key not in metrics:
      return None
    metrics = metrics[key]
  return metrics


def summary_table(results: dict) -> str:
  """Markdown table of the run and its baselines."""
  rows = [(results["method"], results["eval"], results["trainable_params"], results["train_minutes"])]
  for name, r in results.get("baselines", {}).items():
    rows.append((f"baseline: {name}", r, r.get("trainable_params", 0), r.get("train_minutes", 0.0)))
  keys = [(k, path) for k, path in _SUMMARY_KEYS if _lookup(results["eval"], path) is not None]
  lines = ["| run | " + " | ".join(k for k, _ in keys) + " | trainable params | train min |",
           "|---" * (len(keys) + 3) + "|"]
  for name, r, n, minutes in rows:
    values = [_lookup(r, path) for _, path in keys]
    lines.append(f"| {name} | " + " | ".join("—" if v is None else f"{v:.4f}" for v in values)
                 + f" | {n:,} | {minutes:.1f} |")
  return "\n".join(lines)


def _load_trained(config, *, workdir=None, adapters_dir=None, step=None):
  """(run, trainable, adapter config, step, source) of a run's checkpoint (the latest, or `step`)
  or of an adapter-only export, with the training settings of the workdir's run."""
  config_lib.validate(config)
  sharding.maybe_initialize_distributed(config.distributed)
  if adapters_dir:
    if step is not None:
      raise errors.ConfigError("step selects a checkpoint in a workdir; an adapter export has no "
                               "steps.")
    if not paths.isfile(paths.join(adapters_dir, "adapter_config.json")):
      raise errors.CheckpointError(
          f"{adapters_dir!r} is not an adapter export (no adapter_config.json); pass the "
          "<workdir>/export/adapters folder a training run wrote.")
    run = run_lib.setup(config)
    trainable, cfg, extra = checkpoint.load_adapters(adapters_dir)
    if cfg.method != run.adapter_cfg.method:
      raise errors.ConfigError(
          f"export {adapters_dir} holds {cfg.method!r} adapters but the config says "
          f"{run.adapter_cfg.method!r}; pass the matching config.")
    return run, trainable, cfg, extra.get("step"), adapters_dir
  workdir = workdir or config.workdir
  # Never create anything under a workdir that is not a run (orbax would make checkpoints/).
  if not paths.isdir(workdir):
    raise errors.CheckpointError(
        f"workdir {workdir!r} does not exist; pass the run's folder with --workdir (or "
        "--config.workdir), or an adapter export with --adapters.")
  if not fingerprint.checkpoint_steps(workdir):
    raise errors.CheckpointError(
        f"workdir {workdir!r} has no checkpoint in {trainer.checkpoint_dir(workdir)}; "
        "train it first (train.py) or pass an adapter export with --adapters.")
  config = _run_settings(config, workdir)
  record = fingerprint.check(config, workdir, purpose="eval")
  run = run_lib.setup(config)
  if record is not None and not record["differences"]:
    diffs = fingerprint.resolved_differences(record.get("resolved", {}),
                                             fingerprint.resolved(run.num_steps, run.train_data))
    if diffs and config.get("resume", "auto") != "force":
      raise errors.RunMismatchError(
          f"workdir {workdir} was trained on other data than this config loads ({'; '.join(diffs)}); "
          "evaluate with the data it was trained on, or pass --config.resume=force.")
  mngr = checkpoint.manager(trainer.checkpoint_dir(workdir))
  state, _ = checkpoint.restore(mngr, sharding.abstract(run.state), step)
  mngr.close()
  return run, state.trainable, run.adapter_cfg, int(state.step), workdir


def _run_settings(config, workdir: str):
  """`config` with the training settings of the run in `workdir` (its run.json), so eval needs
  only the evaluation settings; each setting taken from the run is logged. With
  config.resume == 'force' the config is used as given (a checkpoint scored under new settings)."""
  record = fingerprint.read(workdir)
  if record is None or config.get("resume", "auto") == "force":
    return config
  config, diffs = config_lib.run_config(config, record)
  if diffs:
    log(f"evaluating with the training settings of the run in {workdir} ({fingerprint.RECORD}); "
        f"{len(diffs)} differ from the config given (config -> run): " + "; ".join(diffs))
    config_lib.validate(config)
  return config


def evaluate_run(config, *, workdir=None, adapters_dir=None, step=None, save=True) -> dict:
  """Evaluates a checkpoint (the latest, or `step`) or an adapter-only export on the eval split.

  The metrics get 'step' and 'source' keys and, with `save`, are written as JSON next to what
  was evaluated: <workdir>/eval_step<N>.json, or <adapters_dir>/eval.json.

  Example:
    >>> from configs import sst2
    >>> evaluate_run(sst2.get_config("method=dora"), workdir="runs/sst2")["accuracy"]
  """
  run, trainable, cfg, step, source = _load_trained(config, workdir=workdir,
                                                    adapters_dir=adapters_dir, step=step)
  out_path = (paths.join(adapters_dir, "eval.json") if adapters_dir
              else paths.join(source, f"eval_step{step}.json"))
  metrics = {"step": step, "source": source, **evaluate_state(run, trainable, cfg)}
  if save and jax.process_index() == 0:
    files.write_json(out_path, metrics)  # never through a symlink planted in the export
  return metrics


def chat(config, prompt: str, *, workdir=None, adapters_dir=None, step=None, base=False,
         system: Optional[str] = None, max_new_tokens: int = 128, key=None,
         temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0) -> str:
  """The model's reply to `prompt`, rendered with the tokenizer's chat template: from a run's
  checkpoint, an adapter export, or (`base`) the model as loaded.

  Greedy without `key`; with a key, sampled (temperature, top_p, top_k). Stops at the
  tokenizer's end-of-turn / EOS token or after max_new_tokens.

  Example:
    >>> from configs import smollm2
    >>> chat(smollm2.get_config(), "What is the capital of France?", workdir="runs/smollm2")
    'The capital of France is Paris.'
  """
  if base:
    run = run_lib.setup(config)
    params, apply_fn = merge_params(run.frozen, run.state.trainable["params"]), run.backbone.apply
  else:
    run, trainable, cfg, _, _ = _load_trained(config, workdir=workdir, adapters_dir=adapters_dir,
                                              step=step)
    params, apply_fn = evaluate.params_and_apply(run.backbone.apply, run.frozen, trainable, cfg)
  if run.backbone.task != "causal_lm":
    raise errors.ConfigError(f"chat needs a causal LM; this config's model.task is "
                             f"{run.backbone.task!r}.")
  tokenizer = run.tokenizer
  if not getattr(tokenizer, "chat_template", None):
    raise errors.ConfigError(f"the tokenizer of {config.model.name!r} has no chat template; chat "
                             "needs an instruct model's tokenizer (e.g. model.name='smollm2').")
  messages = ([{"role": "system", "content": system}] if system else []) + [
      {"role": "user", "content": prompt}]
  ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
  ids = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
  # The template's end-of-turn token (the tokenizer's EOS) and the model's own EOS ids.
  stops = set(eos_ids(run.backbone.config.get("eos_token_id")))
  stops = sorted(stops | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()))
  new = generate_tokens(run.backbone, params, ids, max_new_tokens=max_new_tokens, key=key,
                        temperature=temperature, top_p=top_p, top_k=top_k, eos_token_id=stops,
                        pad_token_id=tokenizer.pad_token_id, apply_fn=apply_fn)
  new = [int(t) for t in new]
  end = next((i for i, t in enumerate(new) if t in stops), len(new))
  return tokenizer.decode(new[:end], skip_special_tokens=True).strip()
