"""The training loop: checkpoints and exact resume, NaN stop, SIGTERM and Ctrl-C saves, progress.

It only runs steps; building the run (doran_jax.run) and what happens after training
(doran_jax.experiment: evaluation, exports, baselines) live elsewhere.

Example:
  >>> out = fit(run_lib.setup(config), "runs/x")
  >>> out["status"], int(out["state"].step)
  ('done', 1000)
"""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import Optional

import jax
from absl import logging
from tqdm import tqdm

from doran_jax import checkpoint, fingerprint, progress, sharding
from doran_jax.adapters import count_params


class NonFiniteLossError(FloatingPointError):
  """The loss, gradient or update became NaN/Inf; the last good checkpoint is kept."""


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


def log(msg: str) -> None:
  """One line on process 0's console (above a running progress bar) and in the absl log."""
  if jax.process_index() == 0:
    tqdm.write(msg, file=sys.stdout)
    sys.stdout.flush()
  logging.info(msg)


def fit(run, workdir: str, *, max_steps: Optional[int] = None) -> dict:
  """Trains `run` from its latest checkpoint in `workdir` (or from its initial state).

  `max_steps` stops this call (with a checkpoint, status 'paused') after that many steps, for
  jobs that run in time-limited chunks; the next call resumes exactly where it stopped.

  Returns:
    {'status': 'done' | 'paused' | 'preempted', 'step', 'history', 'state', 'train_minutes'}.
  """
  config = run.config
  # Another run's workdir stops here, before anything in it is written (see doran_jax.fingerprint).
  fingerprint.claim(config, workdir, fingerprint.resolved(run.num_steps, run.train_data),
                    write=jax.process_index() == 0)
  os.makedirs(workdir, exist_ok=True)
  ckpt_cfg = config.checkpoint
  mngr = checkpoint.manager(os.path.join(workdir, "checkpoints"), max_to_keep=ckpt_cfg.max_to_keep)
  # The step donates its input state: train a copy, so `run.state` stays the initial state.
  state = jax.tree_util.tree_map(lambda x: x.copy(), run.state)
  if mngr.latest_step() is not None:
    state, meta = checkpoint.restore(mngr, sharding.abstract(state))
    log(f"resumed from step {int(state.step)} ({mngr.directory}); data position {meta['data_step']}")
  bs = config.batch_size
  if bs % jax.process_count():
    raise ValueError(f"batch_size {bs} must divide by the {jax.process_count()} processes.")
  history = []
  start_step = int(state.step)
  writer = progress.MetricWriter(workdir, total_steps=run.num_steps, start_step=start_step,
                                 progress_bar=config.progress_bar,
                                 tensorboard=bool(config.tensorboard),
                                 enabled=jax.process_index() == 0, truncate_after=start_step)
  t0 = time.time()
  t_last, last_step, t_step = t0, start_step, t0
  log(f"training {run.adapter_cfg.method} for {run.num_steps} steps (batch {bs}, "
      f"{len(run.train_data)} train / {len(run.eval_data)} eval examples, "
      f"{count_params(state.trainable)} trainable parameters)")
  status = "done"
  try:
    with _Preemption() as preemption:
      for step in range(start_step, run.num_steps):
        local = run.train_data.batch(step, bs, seed=config.seed, process_index=jax.process_index(),
                                     process_count=jax.process_count())
        state, metrics = run.train_step(state, run.frozen, sharding.global_batch(local, run.mesh))
        metrics = jax.device_get(metrics)
        if not metrics["finite"]:
          mngr.wait_until_finished()
          raise NonFiniteLossError(
              f"loss became {metrics['loss']} at step {step + 1} (grad norm {metrics['grad_norm']}, "
              f"update norm {metrics['update_norm']}); the update was skipped and the run stopped. "
              f"Last good checkpoint: step {mngr.latest_step()} in {mngr.directory}. Lower "
              "optim.lr, enable optim.clip_norm, or check the data.")
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
        if done % config.log_every == 0 or done == run.num_steps or done == start_step + 1:
          rate = (done - last_step) / max(now - t_last, 1e-9)
          eta = (run.num_steps - done) / max(rate, 1e-9)
          log(f"step {done}/{run.num_steps} loss {record['loss']:.4f} lr {record['lr']:.2e} "
              f"{rate:.2f} step/s {rate * bs:.1f} examples/s eta {eta:.0f}s")
          t_last, last_step = now, done
        meta = {"data_step": done, "adapter": run.adapter_cfg.to_dict()}
        pause = max_steps is not None and done - start_step >= max_steps and done < run.num_steps
        if done % ckpt_cfg.every == 0 or done == run.num_steps or preemption.requested or pause:
          checkpoint.save(mngr, done, state, meta, force=True)
        if pause:
          status = "paused"
          break
        if preemption.requested:
          mngr.wait_until_finished()
          log(f"preempted: checkpoint at step {done} saved in {mngr.directory}; rerun to resume.")
          status = "preempted"
          break
    mngr.wait_until_finished()
  finally:
    mngr.close()
    writer.close()
  return {"status": status, "step": int(state.step), "history": history, "state": state,
          "train_minutes": (time.time() - t0) / 60}
