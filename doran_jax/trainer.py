"""The training loop: one jitted step from one CPU core to a pod, exact resume, NaN stop, SIGTERM save.

A notebook calls the same functions as train.py:
  >>> run = setup(config)                  # model, data, adapters, optimizer, mesh, shardings
  >>> results = train(config, workdir)     # the whole loop, checkpoints, evaluation, exports
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import re
import signal
import sys
import time
from typing import Any, Callable, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from tqdm import tqdm

from doran_jax import (checkpoint, data, evaluate, fused, models, optim, progress, sharding,
                       tasks)
from doran_jax.adapters import AdapterConfig, count_params, init_adapters
from doran_jax.adapters.factored import adapted_apply
from doran_jax.trainable import effective_params, merge_params, split_params

DEFAULT_HEADS = {"classification": r"classifier/.*", "image_classification": r"classifier/.*",
                 "causal_lm": ""}


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN/Inf; the last good checkpoint is kept."""


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  trainable: Any      # {"params": head (or the whole backbone for 'full'), "adapters": adapter tree}
  opt_state: Any
  rng: jax.Array      # raw uint32 key; per-step keys are fold_in(rng, step), so resume is exact
  extra: Any          # method state outside the gradient (e.g. DynDoRA's importance EMA)


# ----------------------------------------------------------------------------------- run setup

@dataclasses.dataclass
class Run:
  """Everything a training run needs; built by `setup`."""

  config: Any
  backbone: models.Backbone
  adapter_cfg: AdapterConfig
  frozen: Any
  state: TrainState
  tx: optax.GradientTransformation
  schedule: Callable
  mesh: Any
  train_data: Any
  eval_data: Any
  tokenizer: Any
  num_steps: int
  state_shardings: Any = None
  frozen_shardings: Any = None
  step_fn: Any = None  # the compiled train step, kept across train() calls on this run


def adapter_config_from(config, transposed=()) -> AdapterConfig:
  return AdapterConfig(**{**config.adapter.to_dict(), "transposed": tuple(transposed)})


def load_tokenizer(config):
  """The text tokenizer for the model (None for image models)."""
  mc = config.model
  if mc.task == "image_classification":
    return None
  path = mc.get("tokenizer", "") or ("" if mc.get("tiny", "") else mc.name)
  if not path:
    raise ValueError("a tiny text model needs config.model.tokenizer (e.g. 'minilm').")
  from transformers import AutoTokenizer
  tokenizer = AutoTokenizer.from_pretrained(models.resolve(path))
  if tokenizer.pad_token is None:
    tokenizer.pad_token = tokenizer.eos_token
  return tokenizer


def load_model(config, num_labels: Optional[int] = None) -> models.Backbone:
  """The backbone named by config.model (num_labels from the data when config says 0)."""
  mc = config.model
  dtype = jnp.dtype(mc.dtype)
  overrides = dict(mc.get("config_overrides", None) or {})
  labels = None if mc.task == "causal_lm" else (mc.num_labels or num_labels)
  if mc.get("tiny", ""):
    hf_config = models.tiny_config(mc.tiny, **overrides)
    if labels:
      hf_config.num_labels = labels
    bb = models.from_config(hf_config, mc.task, seed=config.seed, dtype=dtype)
  else:
    bb = models.load_backbone(mc.name, mc.task, num_labels=labels, dtype=dtype,
                              config_overrides=overrides)
  if mc.get("param_dtype", "float32") != "float32":
    bb.params = jax.tree_util.tree_map(lambda x: x.astype(mc.param_dtype), bb.params)
  return bb


def num_train_steps(config, n_train: int) -> int:
  if config.get("num_steps", None):
    return int(config.num_steps)
  return max(1, math.ceil(config.num_epochs * n_train / config.batch_size))


def setup(config, *, backbone=None, tokenizer=None, with_data: bool = True) -> Run:
  """Builds model, data, adapters, optimizer, mesh and sharded state from a config.

  `with_data=False` skips the data sets (benchmarks feed their own batches; config.num_steps and
  config.model.num_labels must then be set).
  """
  sharding.maybe_initialize_distributed(config.get("distributed", "auto"))
  train_data = eval_data = None
  if with_data:
    if tokenizer is None:
      tokenizer = load_tokenizer(config)
    image_size = config.data.get("image_size", None)
    train_data = data.load_dataset(config.data, "train", tokenizer=tokenizer, image_size=image_size)
    eval_data = data.load_dataset(config.data, "eval", tokenizer=tokenizer, image_size=image_size)
  if backbone is None:
    backbone = load_model(config, train_data.num_classes if train_data else None)
  if config.model.get("remat", False):
    models.enable_remat(backbone)
  adapter_cfg = adapter_config_from(config, backbone.transposed)
  num_steps = num_train_steps(config, len(train_data)) if train_data else int(config.num_steps)

  head_regex = config.get("head", None)
  head_regex = DEFAULT_HEADS[config.model.task] if head_regex is None else head_regex
  head_regex = "" if config.adapter.method == "full" else head_regex
  trainable_params, frozen = split_params(backbone.params, config.adapter.method, head_regex)
  key = jax.random.PRNGKey(config.seed)
  key_init, key_run = jax.random.split(key)
  adapters = init_adapters(key_init, backbone.params, adapter_cfg)
  trainable = {"params": trainable_params, "adapters": adapters}
  logging.info("trainable: %d adapter + %d head/backbone parameters (%s)", count_params(adapters),
               count_params(trainable_params), adapter_cfg.method)

  mesh = sharding.make_mesh(config.mesh)
  rules = sharding_rules(config)
  frozen_specs = sharding.param_specs(frozen, mesh, rules)
  trainable_specs = {"params": sharding.param_specs(trainable_params, mesh, rules),
                     "adapters": sharding.adapter_specs(
                         adapters, backbone.params, sharding.param_specs(backbone.params, mesh, rules),
                         adapter_cfg, mesh)}
  frozen = jax.device_put(frozen, sharding.named(mesh, frozen_specs))
  trainable = jax.device_put(trainable, sharding.named(mesh, trainable_specs))
  backbone.params = None  # the frozen/trainable split owns the weights now

  tx, schedule = optim.make_optimizer(config.optim, num_steps, trainable, config.get("freeze", ()))
  opt_state = jax.jit(tx.init)(trainable)
  extra = method_state_init(adapter_cfg, adapters)
  state = TrainState(step=jnp.zeros((), jnp.int32), trainable=trainable, opt_state=opt_state,
                     rng=key_run, extra=extra)
  # Leaves not already laid out on the mesh (step, rng, optimizer counts) are replicated on it.
  replicated = sharding.named(mesh, jax.sharding.PartitionSpec())
  state = jax.tree_util.tree_map(
      lambda x: x if len(x.sharding.device_set) == mesh.size else jax.device_put(x, replicated), state)
  state_shardings = jax.tree_util.tree_map(lambda x: x.sharding, state)
  frozen_shardings = jax.tree_util.tree_map(lambda x: x.sharding, frozen)
  return Run(config=config, backbone=backbone, adapter_cfg=adapter_cfg, frozen=frozen, state=state,
             tx=tx, schedule=schedule, mesh=mesh, train_data=train_data, eval_data=eval_data,
             tokenizer=tokenizer, num_steps=num_steps, state_shardings=state_shardings,
             frozen_shardings=frozen_shardings)


def sharding_rules(config):
  rules = config.get("sharding_rules", "replicated")
  named = {"replicated": sharding.REPLICATED_RULES, "fsdp": sharding.FSDP_RULES,
           "tensor_parallel": sharding.TENSOR_PARALLEL_RULES}
  if isinstance(rules, str):
    if rules not in named:
      raise ValueError(f"unknown sharding_rules {rules!r}; choose {', '.join(named)} or a list.")
    return named[rules]
  return [(r, tuple(s)) for r, s in rules]


def method_state_init(adapter_cfg: AdapterConfig, adapters) -> dict:
  """State outside the gradient that some methods keep (DynDoRA's importance EMA and mask)."""
  if adapter_cfg.method == "dyndora":
    from doran_jax import dynrank
    return dynrank.init_state(adapters, adapter_cfg)
  return {}


# ----------------------------------------------------------------------------------- steps

def make_train_step(run: Run):
  """The pure train step: (state, frozen, batch) -> (state, metrics), jitted with shardings.

  Gradients are taken w.r.t. `state.trainable` only; a non-finite loss or gradient leaves the
  state unchanged (metrics['finite'] = 0) so the host can stop with the last good state.
  """
  model, task, adapter_cfg, tx = run.backbone.model, run.config.model.task, run.adapter_cfg, run.tx
  accum = int(run.config.optim.get("accum_steps", 1))
  dynamic_rank = adapter_cfg.method == "dyndora"
  fused_enabled = bool(run.config.model.get("fused_layers", True))
  if dynamic_rank:
    from doran_jax import dynrank
    dyn_cfg, num_steps = run.config.dyndora, run.num_steps

  def loss_fn(trainable, frozen, batch, key, step):
    key_adapter, key_dropout = jax.random.split(key)
    inputs = tasks.model_inputs(task, batch)
    with fused.fused_layers(fused_enabled):
      if adapter_cfg.mode == "factored":
        out = adapted_apply(model, merge_params(frozen, trainable["params"]),
                            trainable["adapters"], adapter_cfg, rng=key_adapter, train=True,
                            dropout_rng=key_dropout, **inputs)
      else:
        params = effective_params(frozen, trainable, adapter_cfg, rng=key_adapter, train=True)
        out = model(**inputs, params=params, dropout_rng=key_dropout, train=True)
    loss, aux = tasks.loss_and_metrics(task, out.logits, batch)
    if dynamic_rank:
      reg = dynrank.regularizer(trainable["adapters"], step, num_steps, dyn_cfg)
      loss, aux = loss + reg, {**aux, "dyndora_reg": reg}
    return loss, aux

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def step(state: TrainState, frozen, batch):
    key = jax.random.fold_in(state.rng, state.step)
    if accum == 1:
      (loss, aux), grads = grad_fn(state.trainable, frozen, batch, key, state.step)
    else:
      micro = jax.tree_util.tree_map(lambda x: x.reshape((accum, -1) + x.shape[1:]), batch)
      first = jax.tree_util.tree_map(lambda x: x[0], micro)
      shapes = jax.eval_shape(grad_fn, state.trainable, frozen, first, key, state.step)
      zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

      def body(carry, xs):
        i, mb = xs
        out = grad_fn(state.trainable, frozen, mb, jax.random.fold_in(key, i), state.step)
        return jax.tree_util.tree_map(jnp.add, carry, out), None

      ((loss, aux), grads), _ = jax.lax.scan(body, zeros, (jnp.arange(accum), micro))
      loss = loss / accum
      grads = jax.tree_util.tree_map(lambda g: g / accum, grads)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.tree.norm(updates))
    trainable = optax.apply_updates(state.trainable, updates)
    extra = state.extra
    if dynamic_rank:  # importance EMA, pruning at scheduled steps, mask held afterwards
      adapters, extra = dynrank.post_update(trainable["adapters"], extra, state.step + 1, num_steps,
                                            dyn_cfg)
      trainable = {**trainable, "adapters": adapters}
    new = state.replace(step=state.step + 1, trainable=trainable, opt_state=opt_state, extra=extra)
    new = jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new, state)
    new = new.replace(step=state.step + 1)
    metrics = {"loss": loss, "grad_norm": grad_norm, "finite": finite.astype(jnp.float32), **aux}
    return new, metrics

  replicated = sharding.named(run.mesh, jax.sharding.PartitionSpec())
  batch_sharding = sharding.named(run.mesh, sharding.batch_spec(run.mesh))
  return jax.jit(step, in_shardings=(run.state_shardings, run.frozen_shardings, batch_sharding),
                 out_shardings=(run.state_shardings, replicated), donate_argnums=(0,))


# ----------------------------------------------------------------------------------- loop

class _Preemption:
  """Turns SIGTERM into a flag the loop checks between steps (save, then exit cleanly)."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread (e.g. some notebook runners)
      self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: saving a checkpoint and exiting.")
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def quiet_third_party_logs() -> None:
  """Keeps the console to our progress lines: transformers' load chatter and the deprecation notice
  of its Flax classes (we pin the last line that has them) go to errors only."""
  import warnings
  import transformers
  transformers.logging.set_verbosity_error()
  warnings.filterwarnings("ignore", message=".*TensorFlow and JAX classes are deprecated.*")
  logging.set_verbosity(logging.WARNING)


def _log(msg: str) -> None:
  if jax.process_index() == 0:
    tqdm.write(msg, file=sys.stdout)  # prints above a running progress bar, or plainly
    sys.stdout.flush()
  logging.info(msg)


def train(config, workdir: Optional[str] = None, *, run: Optional[Run] = None,
          max_steps: Optional[int] = None) -> dict:
  """Trains with checkpoints/resume, evaluates, exports. Returns the results dict.

  `max_steps` stops this call (with a checkpoint, status 'paused') after that many steps, for
  jobs that run in time-limited chunks; the next call resumes exactly where it stopped.

  Example:
    >>> from configs import default
    >>> results = train(default.get_config(), "runs/default")
  """
  workdir = workdir or config.workdir
  run = run or setup(config)
  os.makedirs(workdir, exist_ok=True)
  ckpt_cfg = config.checkpoint
  mngr = checkpoint.manager(os.path.join(workdir, "checkpoints"), max_to_keep=ckpt_cfg.max_to_keep)
  state = run.state
  if mngr.latest_step() is not None:
    state, meta = checkpoint.restore(mngr, jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state))
    _log(f"resumed from step {int(state.step)} ({mngr.directory}); data position {meta['data_step']}")
  if run.step_fn is None:
    run.step_fn = make_train_step(run)
  step_fn = run.step_fn
  bs = config.batch_size
  if bs % jax.process_count():
    raise ValueError(f"batch_size {bs} must divide by the {jax.process_count()} processes.")
  log_every = int(config.get("log_every", 50))
  history = []
  start_step = int(state.step)
  writer = progress.MetricWriter(workdir, total_steps=run.num_steps, start_step=start_step,
                                 progress_bar=config.get("progress_bar", None),
                                 tensorboard=bool(config.get("tensorboard", False)),
                                 enabled=jax.process_index() == 0)
  t0 = time.time()
  t_last, last_step, t_step = t0, start_step, t0
  _log(f"training {run.adapter_cfg.method} for {run.num_steps} steps (batch {bs}, "
       f"{len(run.train_data)} train / {len(run.eval_data)} eval examples, "
       f"{count_params(state.trainable)} trainable parameters)")
  try:
    with _Preemption() as preemption:
      for step in range(start_step, run.num_steps):
        local = run.train_data.batch(step, bs, seed=config.seed, process_index=jax.process_index(),
                                     process_count=jax.process_count())
        batch = sharding.global_batch(local, run.mesh)
        state, metrics = step_fn(state, run.frozen, batch)
        metrics = jax.device_get(metrics)
        if not metrics["finite"]:
          mngr.wait_until_finished()
          last = mngr.latest_step()
          raise NonFiniteLossError(
              f"loss became {metrics['loss']} at step {step + 1} (grad norm {metrics['grad_norm']}); "
              f"the update was skipped and the run stopped. Last good checkpoint: step {last} in "
              f"{mngr.directory}. Lower optim.lr, enable optim.clip_norm, or check the data.")
        record = {"step": step + 1, "loss": float(metrics["loss"]),
                  "grad_norm": float(metrics["grad_norm"]), "lr": float(run.schedule(step))}
        if "correct" in metrics:
          record["train_accuracy"] = float(metrics["correct"] / max(metrics["examples"], 1))
        history.append(record)
        now = time.time()
        writer.train_step(step + 1, {k.replace("train_", ""): v for k, v in record.items()
                                     if k != "step"},
                          examples_per_s=bs / max(now - t_step, 1e-9))
        t_step = now
        done = step + 1
        if done % log_every == 0 or done == run.num_steps or done == start_step + 1:
          rate = (done - last_step) / max(now - t_last, 1e-9)
          eta = (run.num_steps - done) / max(rate, 1e-9)
          _log(f"step {done}/{run.num_steps} loss {record['loss']:.4f} lr {record['lr']:.2e} "
               f"{rate:.2f} step/s {rate * bs:.1f} examples/s eta {eta:.0f}s")
          t_last, last_step = now, done
        meta = {"data_step": done, "adapter": run.adapter_cfg.to_dict()}
        pause = max_steps is not None and done - start_step >= max_steps
        if done % ckpt_cfg.every == 0 or done == run.num_steps or preemption.requested or pause:
          checkpoint.save(mngr, done, state, meta, force=True)
        if pause and done < run.num_steps:
          mngr.wait_until_finished()
          mngr.close()
          run.state = state
          return {"status": "paused", "step": done, "history": history}
        if preemption.requested:
          mngr.wait_until_finished()
          _log(f"preempted: checkpoint at step {done} saved in {mngr.directory}; rerun to resume.")
          mngr.close()
          return {"status": "preempted", "step": done, "history": history}
    mngr.wait_until_finished()
    mngr.close()
    train_time = time.time() - t0
    results = {"status": "done", "method": run.adapter_cfg.method, "steps": run.num_steps,
               "train_minutes": train_time / 60, "history": history,
               "trainable_params": count_params(state.trainable),
               "adapter_params": count_params(state.trainable["adapters"])}
    if run.adapter_cfg.method == "dyndora" and jax.process_index() == 0:
      from doran_jax import dynrank
      adapters = jax.device_get(state.trainable["adapters"])
      _log(dynrank.rank_report(adapters, os.path.join(workdir, "dyndora_ranks.png")))
      results["live_adapter_params"] = dynrank.count_live_params(adapters)
      results["live_ranks"] = dynrank.live_ranks(adapters)
    results["eval"] = evaluate.evaluate(run.backbone.model, config.model.task, run.frozen,
                                        state.trainable, run.adapter_cfg, run.eval_data,
                                        config.eval_batch_size)
    generate = config.get("generate", None)
    if config.model.task == "causal_lm" and generate and generate.get("enabled", False):
      results["eval"]["commonsense"] = generation_eval(run, state, generate)
    _log(f"eval ({run.adapter_cfg.method}): " + json.dumps(results["eval"]))
    writer.write(run.num_steps, progress.flatten_metrics(results["eval"], "eval/"))
  finally:
    writer.close()
  export(run, state, workdir)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "results.json"), "w") as f:
      json.dump({k: v for k, v in results.items() if k != "history"}, f, indent=2)
  run.state = state
  return results


def generation_eval(run: Run, state: TrainState, generate) -> dict:
  """Commonsense accuracy: greedy generation with the merged weights, answer word extracted."""
  from doran_jax import commonsense
  limit = int(generate.get("limit_per_task", 0) or 0)
  seen, examples = collections.Counter(), []
  for example in run.eval_data.examples or []:
    seen[example["task"]] += 1
    if not limit or seen[example["task"]] <= limit:
      examples.append(example)
  merged = evaluate.merged_params(run.frozen, state.trainable, run.adapter_cfg)
  generate_fn = commonsense.make_generate_fn(run.backbone.model, merged, run.tokenizer,
                                             max_new_tokens=int(generate.get("max_new_tokens", 32)))
  return commonsense.evaluate_commonsense(generate_fn, examples, None,
                                          batch_size=run.config.eval_batch_size)


def export(run: Run, state: TrainState, workdir: str) -> None:
  """Adapter-only export always; the merged save_pretrained export when config.export.merged."""
  if jax.process_index() != 0:
    return
  extra = {"model": run.config.model.to_dict(), "head": run.config.get("head", None),
           "step": int(state.step)}
  checkpoint.export_adapters(os.path.join(workdir, "export", "adapters"), state.trainable,
                             run.adapter_cfg, extra)
  if run.config.get("export", {}).get("merged", False):
    merged = jax.jit(lambda f, t: effective_params(f, t, run.adapter_cfg, train=False))(
        run.frozen, state.trainable)
    checkpoint.export_merged(os.path.join(workdir, "export", "merged"), run.backbone.model, merged,
                             run.tokenizer)


def run_experiment(config, workdir: Optional[str] = None) -> dict:
  """train() plus the configured baselines ('majority', 'frozen'), with a summary table printed.

  The frozen baseline trains only the task head for the same number of steps in
  `<workdir>/baseline_frozen`.
  """
  workdir = workdir or config.workdir
  run = setup(config)
  results = train(config, workdir, run=run)
  if results["status"] != "done":
    return results
  baselines = {}
  if "majority" in config.baselines:
    baselines["majority"] = evaluate.majority_baseline(run.train_data, run.eval_data)
  if "frozen" in config.baselines and config.adapter.method != "frozen":
    frozen_config = config.copy_and_resolve_references()
    with frozen_config.unlocked():
      frozen_config.adapter.method = "frozen"
      frozen_config.num_steps = run.num_steps
    frozen_results = train(frozen_config, os.path.join(workdir, "baseline_frozen"))
    baselines["frozen"] = {**frozen_results["eval"], "train_minutes": frozen_results["train_minutes"],
                           "trainable_params": frozen_results["trainable_params"]}
  results["baselines"] = baselines
  _log(summary_table(results))
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "results.json"), "w") as f:
      json.dump({k: v for k, v in results.items() if k != "history"}, f, indent=2)
  return results


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
