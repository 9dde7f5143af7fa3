"""Checkpoints (orbax) and exports.

A checkpoint holds the TrainState (trainable tree, optimizer state, step, RNG and any method state)
plus a JSON record (the data position and the adapter config). Exports:
  - adapter-only: `adapters.msgpack` (trainable tree) + `adapter_config.json`;
  - merged: doran_jax.models.save_pretrained (the backbone with the adapters folded in).
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import serialization

from doran_jax.adapters.config import AdapterConfig
from doran_jax.targets import flatten


def manager(directory: str, *, max_to_keep: Optional[int] = 3, async_save: bool = True) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                         enable_async_checkpointing=async_save)
  # Handlers are named up front so a fresh process can read the metadata before restoring.
  return ocp.CheckpointManager(os.path.abspath(directory), options=options, item_handlers={
      "state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})


def save(mngr: ocp.CheckpointManager, step: int, state, meta: dict, *, force: bool = False) -> bool:
  saved = mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                  meta=ocp.args.JsonSave(meta)), force=force)
  if saved:
    logging.info("checkpoint: saving step %d to %s", step, mngr.directory)
  return saved


def _shapes(tree) -> dict[str, tuple]:
  return {"/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path):
          tuple(np.shape(leaf)) for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def restore(mngr: ocp.CheckpointManager, abstract_state, step: Optional[int] = None):
  """Restores (state, meta) at `step` (default latest) onto the shardings of `abstract_state`.

  Raises:
    ValueError: the checkpoint's arrays do not match this run (other model, rank or method).
  """
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise ValueError(f"no checkpoint in {mngr.directory}.")
  if step not in mngr.all_steps():
    raise ValueError(f"no checkpoint for step {step} in {mngr.directory}; it holds steps "
                     f"{sorted(mngr.all_steps())}.")
  stored = mngr.item_metadata(step)["state"]
  want, have = _shapes(abstract_state), _shapes(stored)
  diffs = [f"{k}: checkpoint {have.get(k)} vs run {v}" for k, v in want.items() if have.get(k) != v]
  diffs += [f"{k}: only in the checkpoint" for k in have if k not in want]
  if diffs:
    raise ValueError(
        f"checkpoint step {step} in {mngr.directory} does not match this run's state "
        f"({len(diffs)} differences, e.g. {diffs[:4]}). Use the config it was written with "
        "(adapter.method, adapter.rank, adapter.targets, model) or a fresh workdir.")
  restored = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
  return restored["state"], restored["meta"]


def export_adapters(directory: str, trainable, cfg: AdapterConfig, extra: Optional[dict] = None) -> None:
  """Writes the trainable tree (adapters + head) and the adapter config as JSON.

  Example:
    >>> export_adapters("runs/x/export", state.trainable, adapter_cfg)
    >>> trainable, cfg = load_adapters("runs/x/export")
  """
  os.makedirs(directory, exist_ok=True)
  host = jax.device_get(trainable)
  with open(os.path.join(directory, "adapters.msgpack"), "wb") as f:
    f.write(serialization.msgpack_serialize(serialization.to_state_dict(host)))
  with open(os.path.join(directory, "adapter_config.json"), "w") as f:
    json.dump({"adapter": cfg.to_dict(), **(extra or {})}, f, indent=2, sort_keys=True)
  logging.info("export: adapters (%d tensors) to %s", len(flatten(host)), directory)


def load_adapters(directory: str) -> tuple[Any, AdapterConfig, dict]:
  """Reads an adapter-only export: (trainable tree, AdapterConfig, the rest of the JSON)."""
  with open(os.path.join(directory, "adapter_config.json")) as f:
    record = json.load(f)
  with open(os.path.join(directory, "adapters.msgpack"), "rb") as f:
    trainable = serialization.msgpack_restore(f.read())
  cfg = AdapterConfig.from_dict(record.pop("adapter"))
  return trainable, cfg, record
