"""The training loop: checkpoints and exact resume, NaN stop, SIGTERM and Ctrl-C saves, progress.

It only runs steps; building the run (doran_jax.run) and what happens after training
(doran_jax.experiment: evaluation, exports, baselines) live elsewhere.

Example:
  >>> out = fit(run_lib.setup(config), "runs/x")
  >>> out["status"], int(out["state"].step)
  ('done', 1000)
"""

from __future__ import annotations

import math
import signal
import sys
import time
from typing import Optional

import jax
import numpy as np
from absl import logging
from tqdm import tqdm

from doran_jax import checkpoint, errors, fingerprint, paths, progress, sharding, workdir_lock
from doran_jax.adapters import count_params


class NonFiniteLossError(errors.UserError, FloatingPointError):
  """The loss, gradient or update became NaN/Inf; the last good checkpoint is kept."""

  kind = "non-finite"


class _Preemption:
  """Turns SIGTERM and Ctrl-C (SIGINT) into a flag the loop checks between steps (save, then exit
  cleanly). A second Ctrl-C aborts at once with KeyboardInterrupt."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.requested = False
    self._previous = {}

  def __enter__(self):
    for signum in self.SIGNALS:
      try:
        self._previous[signum] = signal.signal(signum, self._handle)
      except ValueError:  # not the main thread (e.g. some notebook runners)
        pass
    return self

  def _handle(self, signum, frame):
    del frame
    if signum == signal.SIGINT and self.requested:
      raise KeyboardInterrupt  # the second Ctrl-C: the user does not want to wait for the save
    name = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
    more = " (Ctrl-C again to abort without saving)" if signum == signal.SIGINT else ""
    log(f"{name} received: saving a checkpoint after this step and exiting{more}.")
    self.requested = True

  def __exit__(self, *exc):
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
    self._previous = {}


# Config values that make a non-finite update likely: (key, is it suspicious?, why).
_SUSPECTS = (
    ("optim.lr", lambda v: not math.isfinite(v) or v <= 0 or v > 1.0, "a learning rate in (0, 1]"),
    ("optim.eps", lambda v: not math.isfinite(v) or v <= 0 or v > 1.0, "a small positive eps"),
    ("optim.b1", lambda v: not math.isfinite(v) or not 0 <= v < 1, "0 <= b1 < 1"),
    ("optim.b2", lambda v: not math.isfinite(v) or not 0 <= v < 1, "0 <= b2 < 1"),
    ("optim.weight_decay", lambda v: not math.isfinite(v) or abs(v) > 10, "a weight decay near 0"),
    ("optim.clip_norm", lambda v: not math.isfinite(v) or v < 0, "clip_norm > 0 (or 0 for off)"),
    ("adapter.alpha", lambda v: not math.isfinite(v) or abs(v) > 1e4, "a finite, moderate alpha"),
)


def _any_process(flag: bool) -> bool:
  """Whether `flag` is set on any process (itself when there is one process).

  A scheduler's SIGTERM reaches the processes of a job at slightly different times; without
  this, one would save and stop while another ran the next step, and both would hang in their
  collectives.
  """
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils
  return bool(np.any(multihost_utils.process_allgather(np.asarray(flag, np.int32))))


def suspicious_config(config) -> list[str]:
  """'key=value (expected ...)' for config values that make NaN/Inf updates likely."""
  out = []
  for key, bad, expected in _SUSPECTS:
    node = config
    try:
      for part in key.split("."):
        node = node[part]
      value = float(node)
    except (KeyError, TypeError, ValueError, AttributeError):
      continue
    if bad(value):
      out.append(f"{key}={value!r} (expected {expected})")
  return out


def nonfinite_message(metrics: dict, step: int, config, last_good: Optional[int],
                      directory: str) -> str:
  """What became NaN/Inf at `step`, the last good checkpoint, the suspicious config values and
  what to try."""
  names = {"loss": "loss", "grad_norm": "gradient norm", "update_norm": "update norm"}
  values = {k: float(metrics[k]) for k in names}
  bad = [names[k] for k, v in values.items() if not math.isfinite(v)]
  what = ", ".join(bad) if bad else "a value"
  lines = [f"non-finite {what} at step {step} (loss {values['loss']:.6g}, gradient norm "
           f"{values['grad_norm']:.6g}, update norm {values['update_norm']:.6g}); the update was "
           "skipped and the run stopped."]
  lines.append(f"Last good checkpoint: step {last_good} in {directory}." if last_good is not None
               else "No checkpoint was saved yet.")
  suspects = suspicious_config(config)
  if suspects:
    lines.append("Suspicious config: " + "; ".join(suspects) + ".")
  if math.isfinite(values["loss"]) and math.isfinite(values["grad_norm"]):
    advice = ("The loss and gradients were finite, so the optimizer made the update non-finite: "
              "check optim.lr, optim.eps and the schedule")
  elif math.isfinite(values["loss"]):
    advice = "The loss was finite but its gradient was not: lower optim.lr or check the data"
  else:
    advice = "Check the data (a NaN/Inf input or label) or lower optim.lr"
  clip = config.optim.get("clip_norm", None) if "optim" in config else None
  if not clip:
    advice += ", or enable optim.clip_norm (e.g. --config.optim.clip_norm=1.0)"
  lines.append(advice + ".")
  return " ".join(lines)


def log(msg: str) -> None:
  """One line on process 0's console (above a running progress bar) and in the absl log."""
  if jax.process_index() == 0:
    tqdm.write(msg, file=sys.stdout)
    sys.stdout.flush()
  logging.info(msg)


class _CompileClock:
  """Seconds JAX spent tracing, lowering and compiling inside the `with` block."""

  _EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
             "/jax/core/compile/jaxpr_to_mlir_module_duration",
             "/jax/core/compile/backend_compile_duration")

  def __init__(self):
    self.seconds = 0.0

  def _listen(self, event, duration, **kwargs):
    del kwargs
    if event in self._EVENTS:
      self.seconds += duration

  def __enter__(self):
    jax.monitoring.register_event_duration_secs_listener(self._listen)
    return self

  def __exit__(self, *exc):
    jax.monitoring.unregister_event_duration_listener(self._listen)


def checkpoint_dir(workdir: str) -> str:
  """<workdir>/checkpoints (a local path or a URL)."""
  return paths.join(workdir, "checkpoints")


def fit(run, workdir: str, *, max_steps: Optional[int] = None) -> dict:
  """Trains `run` from its latest checkpoint in `workdir` (or from its initial state).

  `max_steps` stops this call (with a checkpoint, status 'paused') after that many steps, for
  jobs that run in time-limited chunks; the next call resumes exactly where it stopped.

  Returns:
    {'status': 'done' | 'paused' | 'preempted', 'step', 'history', 'state', 'train_minutes'}.
  """
  paths.for_orbax(checkpoint_dir(workdir))  # a workdir orbax cannot write: refused up front
  with workdir_lock.held(workdir, enabled=jax.process_index() == 0):
    return _fit(run, workdir, max_steps)


def _beyond_the_run(workdir: str, num_steps: int) -> None:
  """A checkpoint past this run's last step cannot be resumed: its model is not this run's."""
  steps = fingerprint.checkpoint_steps(workdir)
  if steps and steps[-1] > num_steps:
    earlier = [s for s in steps if s <= num_steps]
    fix = (f"evaluate an earlier checkpoint with eval.py --step {earlier[-1]}, or " if earlier
           else "")
    raise errors.RunMismatchError(
        f"workdir {workdir} holds a checkpoint at step {steps[-1]}, beyond this run's "
        f"{num_steps} steps: resuming it would report the step-{steps[-1]} model as the "
        f"{num_steps}-step result. Nothing was changed. Train to {num_steps} steps in a new "
        f"--config.workdir, {fix}or continue with num_steps >= {steps[-1]}.")


def _fit(run, workdir: str, max_steps: Optional[int]) -> dict:
  t_enter = time.time()
  config = run.config
  # Another run's workdir stops here, before anything in it is written (see doran_jax.fingerprint).
  record = fingerprint.claim(config, workdir, fingerprint.resolved(run.num_steps, run.train_data))
  _beyond_the_run(workdir, run.num_steps)
  paths.makedirs(workdir)
  ckpt_cfg = config.checkpoint
  mngr = checkpoint.manager(checkpoint_dir(workdir))
  # The step donates its input state: train a copy, so `run.state` stays the initial state
  # (one jitted copy of the whole tree, not one compile per leaf).
  state = jax.jit(lambda tree: jax.tree_util.tree_map(lambda x: x.copy(), tree),
                  out_shardings=run.state_shardings)(run.state)
  last_good = None  # the newest checkpoint known complete and intact
  damaged = {}      # step -> why, for the steps restore skipped (never counted as kept)
  if mngr.all_steps():
    state, meta, damaged = checkpoint.restore_newest_intact(mngr, sharding.abstract(state))
    last_good = int(state.step)
    skipped = f"; skipped damaged step(s) {sorted(damaged)}" if damaged else ""
    log(f"resumed from step {last_good} ({mngr.directory}); data position {meta['data_step']}"
        f"{skipped}")
  # Only now is the identity recorded: a forced resume that failed to restore (another rank or
  # method) leaves run.json as it was, so the run's own command still resumes it.
  if jax.process_index() == 0:
    fingerprint.commit(workdir, record)
  bs = config.batch_size
  if bs % jax.process_count():
    raise errors.ConfigError(f"batch_size {bs} must divide by the {jax.process_count()} "
                             "processes; pick a multiple of the process count.")
  history = []
  start_step = int(state.step)
  writer = progress.MetricWriter(workdir, total_steps=run.num_steps, start_step=start_step,
                                 progress_bar=config.progress_bar,
                                 tensorboard=bool(config.tensorboard),
                                 enabled=jax.process_index() == 0, truncate_after=start_step)
  t0 = time.time()
  t_last, last_step = t0, start_step
  schedule = jax.jit(run.schedule)  # one compile, not one per eager op of the schedule
  saved = None
  single = jax.process_count() == 1
  pending = []  # (step, metrics still on the device) since the last fetch
  t_fetch = t0
  log(f"training {run.adapter_cfg.method} for {run.num_steps} steps (batch {bs}, "
      f"{len(run.train_data)} train / {len(run.eval_data)} eval examples, "
      f"{count_params(state.trainable)} trainable parameters)")
  status = "done"
  try:
    with _Preemption() as preemption:
      for step in range(start_step, run.num_steps):
        local = run.train_data.batch(step, bs, seed=config.seed, process_index=jax.process_index(),
                                     process_count=jax.process_count())
        with _CompileClock() as clock:
          state, metrics = run.train_step(state, run.frozen,
                                          sharding.global_batch(local, run.mesh))
        done = step + 1
        pending.append((done, metrics))
        if len(pending) > 1:
          # At most one step queued behind the one running: the device never waits for the
          # host, and the host never runs so far ahead that a signal or a NaN waits for a long
          # queue (or queued batches fill memory).
          jax.block_until_ready(pending[-2][1])
        if step == start_step:
          jax.block_until_ready(metrics)
          log(f"first step after {time.time() - t_enter:.1f} s (compile {clock.seconds:.1f} s)")
        elif clock.seconds:
          logging.warning("the train step compiled again at step %d (%.1f s): its inputs changed "
                          "shape or sharding.", done, clock.seconds)
        pause = max_steps is not None and done - start_step >= max_steps and done < run.num_steps
        save_due = done % ckpt_cfg.every == 0 or done == run.num_steps or pause
        log_due = done % config.log_every == 0 or done == run.num_steps or done == start_step + 1
        # Metrics stay on the device between sync points, so the host dispatches the next step
        # while this one runs; a single process also syncs at once when a signal arrived.
        sync = save_due or log_due or (single and preemption.requested)
        if not sync:
          continue
        # One host fetch for every step since the last one; NaN/Inf is caught here, before any
        # save, so a checkpoint never holds a state past a non-finite step.
        fetched = jax.device_get([m for _, m in pending])
        now = time.time()
        per_step = (now - t_fetch) / len(pending)
        for (at, _), values in zip(pending, fetched):
          if not values["finite"]:
            mngr.wait_until_finished()
            last_good = saved if saved is not None else last_good
            raise NonFiniteLossError(nonfinite_message(values, at, config, last_good,
                                                       str(mngr.directory)))
          record = {"step": at, "loss": float(values["loss"]),
                    "grad_norm": float(values["grad_norm"]), "lr": float(schedule(at - 1))}
          if "correct" in values:
            record["train_accuracy"] = float(values["correct"] / max(values["examples"], 1))
          history.append(record)
          writer.train_step(at, {k.replace("train_", ""): v for k, v in record.items()
                                 if k != "step"},
                            examples_per_s=bs / max(per_step, 1e-9))
        pending, t_fetch = [], now
        if log_due:
          rate = (done - last_step) / max(now - t_last, 1e-9)
          eta = (run.num_steps - done) / max(rate, 1e-9)
          log(f"step {done}/{run.num_steps} loss {record['loss']:.4f} lr {record['lr']:.2e} "
              f"{rate:.2f} step/s {rate * bs:.1f} examples/s eta {eta:.0f}s")
          t_last, last_step = now, done
        meta = {"data_step": done, "adapter": run.adapter_cfg.to_dict()}
        # Every process stops at the same step (the save and the steps are collectives), so
        # several processes agree on a signal at the sync points only: one all-gather per sync
        # point rather than per step. They honour SIGTERM within log_every steps.
        stop = preemption.requested if single else _any_process(preemption.requested)
        if save_due or stop:
          checkpoint.save(mngr, done, state, meta, max_to_keep=ckpt_cfg.max_to_keep,
                          damaged=damaged, force=True)
          saved = done
          damaged.pop(done, None)  # the damaged one was moved aside; this one is new
        if pause:
          status = "paused"
          break
        if stop:
          mngr.wait_until_finished()
          log(f"preempted: checkpoint at step {done} saved in {mngr.directory}; rerun to resume.")
          status = "preempted"
          break
    mngr.wait_until_finished()
    checkpoint.prune(mngr, ckpt_cfg.max_to_keep, damaged)
  finally:
    mngr.close()
    writer.close()
  return {"status": status, "step": int(state.step), "history": history, "state": state,
          "train_minutes": (time.time() - t0) / 60}
