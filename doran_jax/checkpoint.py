"""Checkpoints (orbax) with integrity checks, and exports.

A checkpoint holds the TrainState (trainable tree, optimizer state, step, RNG and any method state),
a JSON record (the data position and the adapter config) and an integrity record: a checksum of
every state array and of the JSON record, written in the same save and verified on restore. A
damaged or incomplete checkpoint (missing or unreadable files, checksum mismatch) is reported in
one line and skipped: `restore` falls back to the newest intact step and deletes nothing.
Retention is ours, not orbax's: older checkpoints are pruned only after a newer one has finished
writing and passes the structural check, so `max_to_keep` never removes the newest intact one.
Exports:
  - adapter-only: `adapters.msgpack` (trainable tree) + `adapter_config.json` + `checksums.json`
    (their SHA-256, `files.write_checksums`), verified by `load_adapters`, which also refuses
    NaN/inf tensors and a non-positive rank or alpha;
  - merged: doran_jax.models.save_pretrained (the backbone with the adapters folded in).
A run's folder may be a gs:// URL: orbax writes there itself (`paths.for_orbax`), and our own
reads of its small JSON files, listings and exports go through `doran_jax.paths`.
"""

from __future__ import annotations

import hashlib
import json
import logging as std_logging
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import serialization

from doran_jax import files, paths
from doran_jax.adapters.config import AdapterConfig
from doran_jax.errors import CheckpointError
from doran_jax.files import inside, write_bytes, write_json
from doran_jax.targets import flatten

INTEGRITY_VERSION = 1


class _UnparsableMetadataNoise(std_logging.Filter):
  """Drops orbax's ERROR record that dumps the whole content of an unparsable step metadata file
  (hundreds of NULs for a zeroed one); restore reports such a step in one line instead."""

  def filter(self, record):
    return not str(record.msg).startswith("Failed to json parse Metadata file")


logging.get_absl_logger().addFilter(_UnparsableMetadataNoise())
DAMAGED_DIR = "damaged"  # damaged steps are moved here (never deleted) when a new save needs the name


def manager(directory: str, *, async_save: bool = True) -> ocp.CheckpointManager:
  """The run's checkpoint manager. Retention is `prune`'s job, not orbax's (see the module doc).

  `directory` may be a gs:// URL (orbax's own support); any other URL is a UserError naming
  what orbax can write (`paths.for_orbax`).

  Example:
    >>> mngr = manager("runs/x/checkpoints")
    >>> state, meta = restore(mngr, sharding.abstract(run.state))
  """
  # max_to_keep=None: orbax's own garbage collection deletes old steps even when the new save
  # fails to finalise, and it counts damaged steps as kept.
  options = ocp.CheckpointManagerOptions(max_to_keep=None, create=True,
                                         enable_async_checkpointing=async_save)
  # Handlers are named up front so a fresh process can read the metadata before restoring.
  return ocp.CheckpointManager(paths.for_orbax(directory), options=options, item_handlers={
      "state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler(),
      "integrity": ocp.JsonCheckpointHandler()})


def _path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def _leaf_checksum(x):
  """Two uint32 sums of the array's bit patterns: plain, and weighted by (2 * flat index + 1).

  Integer sums mod 2**32 do not depend on the reduction order, so the checksum is the same on
  any mesh or process count. Any single changed element changes the weighted sum (odd weights
  are invertible mod 2**32).
  """
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    bits = x.astype(jnp.uint32)
  elif x.dtype.itemsize == 8:
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)  # a trailing axis of 2 words
  else:
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
    bits = jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)
  # The flat (row-major) index from per-axis iotas: no reshape, so a sharded leaf stays sharded.
  index, stride = jnp.zeros(bits.shape, jnp.uint32), 1
  for axis in reversed(range(bits.ndim)):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, bits.shape, axis) * jnp.uint32(stride)
    stride = (stride * bits.shape[axis]) % 2**32
  weight = index * jnp.uint32(2) + jnp.uint32(1)
  return jnp.stack([jnp.sum(bits, dtype=jnp.uint32), jnp.sum(bits * weight, dtype=jnp.uint32)])


@jax.jit
def _checksum_leaves(leaves):
  return [_leaf_checksum(x) for x in leaves]


def array_checksums(tree) -> dict[str, str]:
  """{leaf path: 16 hex digits} for every array of `tree`, computed where the arrays live.

  Example:
    >>> array_checksums({"w": jnp.ones((2, 3))})
    {'w': '7d000000ee000000'}
  """
  paths_leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  sums = jax.device_get(_checksum_leaves([jnp.asarray(leaf) for _, leaf in paths_leaves]))
  return {_path_str(path): f"{int(s[0]):08x}{int(s[1]):08x}"
          for (path, _), s in zip(paths_leaves, sums)}


def meta_checksum(meta: dict) -> str:
  """SHA-256 of the JSON record in a canonical form (sorted keys)."""
  return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()


def integrity_record(state, meta: dict) -> dict:
  return {"version": INTEGRITY_VERSION, "arrays": array_checksums(state),
          "meta_sha256": meta_checksum(meta)}


def step_path(mngr: ocp.CheckpointManager, step: int) -> str:
  return paths.join(str(mngr.directory), str(step))


def save(mngr: ocp.CheckpointManager, step: int, state, meta: dict, *,
         max_to_keep: Optional[int] = None, damaged=(), force: bool = False) -> bool:
  """Starts an (async) save of state + meta + their checksums at `step`.

  First waits for the previous save and prunes to `max_to_keep` intact steps (so a step is
  deleted only once a newer one is complete); a damaged checkpoint already at `step` is moved
  to `<dir>/damaged/` rather than overwritten. `damaged`: steps found damaged on restore.
  """
  mngr.wait_until_finished()
  prune(mngr, max_to_keep, damaged)
  if step in mngr.all_steps():
    _set_aside(mngr, step)
  record = integrity_record(state, meta)
  saved = mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta),
      integrity=ocp.args.JsonSave(record)), force=force)
  if saved:
    logging.info("checkpoint: saving step %d to %s", step, mngr.directory)
  return saved


def _set_aside(mngr: ocp.CheckpointManager, step: int) -> None:
  source = step_path(mngr, step)
  if jax.process_index() == 0:
    target = paths.join(str(mngr.directory), DAMAGED_DIR, str(step))
    n = 1
    while paths.exists(target):
      n += 1
      target = paths.join(str(mngr.directory), DAMAGED_DIR, f"{step}.{n}")
    paths.makedirs(paths.join(str(mngr.directory), DAMAGED_DIR))
    paths.move(source, target)  # on an object store: copied, then deleted
    logging.warning("checkpoint step %d at %s was not restorable; moved to %s (not deleted) to "
                    "save the new step %d.", step, source, target, step)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(f"doran_jax set aside step {step}")
  mngr.reload()


_WARNED: set = set()


def prune(mngr: ocp.CheckpointManager, max_to_keep: Optional[int], damaged=()) -> list[int]:
  """Deletes the oldest complete steps beyond the newest `max_to_keep` intact ones.

  Steps in `damaged` (found so on restore) and steps that fail the structural check (`problem`)
  are neither counted nor deleted, so a damaged newest step never pushes out the newest intact
  one. Call after `mngr.wait_until_finished()`. Returns the deleted steps.
  """
  if not max_to_keep:
    return []
  kept, deleted = 0, []
  for step in sorted(mngr.all_steps(), reverse=True):
    issue = "it failed verification on restore" if step in damaged else problem(mngr, step)
    if issue is not None:
      if step not in damaged and step_path(mngr, step) not in _WARNED:  # restore said so already
        _WARNED.add(step_path(mngr, step))
        logging.warning("checkpoint step %d at %s is damaged (%s); kept, and not counted in "
                        "max_to_keep.", step, step_path(mngr, step), issue)
    elif kept < max_to_keep:
      kept += 1
    else:
      mngr.delete(step)
      deleted.append(step)
  return deleted


def _short(error: BaseException, limit: int = 160) -> str:
  lines = str(error).strip().splitlines() or [""]
  # TensorStore appends a dump of its internals after "See full TensorStore details".
  text = f"{type(error).__name__}: {lines[0].split(' See full TensorStore details')[0]}"
  return text if len(text) <= limit else text[:limit - 3] + "..."


def _read_json(path: str, what: str):
  """The parsed file, or raises _Damaged naming what is wrong with it."""
  try:
    return json.loads(paths.read_bytes(path).decode("utf-8"))
  except FileNotFoundError:
    parent, name = path.rstrip("/").rsplit("/", 2)[-2:]
    raise _Damaged(f"{what} is missing ({parent}/{name})") from None
  except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
    raise _Damaged(f"{what} is not valid JSON ({_short(e)})") from None


class _Damaged(Exception):
  """Internal: why one checkpoint step is not restorable."""


def problem(mngr: ocp.CheckpointManager, step: int) -> Optional[str]:
  """Why `step` is structurally incomplete (missing or unreadable metadata, no checksum
  record), or None. Cheap: reads only the small JSON files, not the arrays."""
  try:
    _structure(mngr, step)
  except _Damaged as e:
    return str(e)
  return None


def _structure(mngr: ocp.CheckpointManager, step: int):
  base = step_path(mngr, step)
  _read_json(paths.join(base, "_CHECKPOINT_METADATA"), "the step metadata")
  _read_json(paths.join(base, "meta", "metadata"), "the data-position record")
  _read_json(paths.join(base, "state", "_METADATA"), "the state's array metadata")
  try:
    record = _read_json(paths.join(base, "integrity", "metadata"), "the checksum record")
  except _Damaged as e:
    if paths.isdir(paths.join(base, "integrity")):
      raise
    raise _Damaged(f"{e}; checkpoints written before doran_jax recorded checksums have none, "
                   "so they cannot be verified") from None
  if not isinstance(record, dict) or record.get("version") != INTEGRITY_VERSION:
    raise _Damaged(f"the checksum record has no version {INTEGRITY_VERSION} entry")
  try:
    stored = mngr.item_metadata(step)["state"]
  except Exception as e:  # orbax raises whatever its reader hits; all mean 'unreadable'
    raise _Damaged(f"its array metadata cannot be read ({_short(e)})") from None
  if stored is None:
    raise _Damaged("its array metadata cannot be read")
  return stored, record


def _shapes(tree) -> dict[str, tuple]:
  return {_path_str(path): tuple(np.shape(leaf))
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _restore_step(mngr: ocp.CheckpointManager, abstract_state, step: int):
  """(state, meta) of one verified step; _Damaged if it is not intact, CheckpointError if it
  is intact but belongs to another run shape."""
  stored, record = _structure(mngr, step)
  want, have = _shapes(abstract_state), _shapes(stored)
  diffs = [f"{k}: checkpoint {have.get(k)} vs run {v}" for k, v in want.items() if have.get(k) != v]
  diffs += [f"{k}: only in the checkpoint" for k in have if k not in want]
  if diffs:
    raise CheckpointError(
        f"checkpoint step {step} in {mngr.directory} does not match this run's state "
        f"({len(diffs)} differences, e.g. {diffs[:4]}). Use the config it was written with "
        "(adapter.method, adapter.rank, adapter.targets, model) or a fresh workdir.")
  try:
    restored = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
  except Exception as e:  # truncated or zeroed array files surface as assorted storage errors
    raise _Damaged(f"its arrays cannot be read ({_short(e)})") from None
  state, meta = restored["state"], restored["meta"]
  if meta_checksum(meta) != record.get("meta_sha256"):
    raise _Damaged("the data-position record does not match its checksum")
  expected, actual = record.get("arrays") or {}, array_checksums(state)
  bad = [k for k in actual if expected.get(k) != actual[k]]
  if bad:
    raise _Damaged(f"checksum mismatch in {len(bad)} of {len(actual)} arrays "
                   f"(e.g. {', '.join(bad[:2])})")
  return state, meta


def restore_newest_intact(mngr: ocp.CheckpointManager, abstract_state):
  """(state, meta, damaged): the newest step that passes every check, onto the shardings of
  `abstract_state`; `damaged` maps each newer step skipped to the reason (one warning line
  each). Nothing is deleted or moved.

  Raises:
    CheckpointError: no checkpoint, none intact (each step and why), or the newest intact one
      does not match this run (other model, rank or method).
  """
  steps = sorted(mngr.all_steps(), reverse=True)
  if not steps:
    raise CheckpointError(f"no checkpoint in {mngr.directory}.")
  damaged = {}
  for i, step in enumerate(steps):
    try:
      state, meta = _restore_step(mngr, abstract_state, step)
    except _Damaged as e:
      damaged[step] = str(e)
      then = f"falling back to step {steps[i + 1]}" if i + 1 < len(steps) else "no older step"
      logging.warning("checkpoint step %d at %s is damaged: %s; %s (nothing deleted).",
                      step, step_path(mngr, step), e, then)
      continue
    return state, meta, damaged
  listing = "; ".join(f"step {s} ({step_path(mngr, s)}): {why}" for s, why in damaged.items())
  raise CheckpointError(
      f"no intact checkpoint in {mngr.directory}: {listing}. Nothing was deleted. Start a new "
      "run with another --workdir, or move the damaged steps away to start this one afresh.")


def restore(mngr: ocp.CheckpointManager, abstract_state, step: Optional[int] = None):
  """Restores (state, meta) at `step` (default: the newest intact step) onto the shardings of
  `abstract_state`, verifying the checksums.

  Raises:
    CheckpointError: no such step, the step is damaged, or its arrays do not match this run.
  """
  if step is None:
    return restore_newest_intact(mngr, abstract_state)[:2]
  if step not in mngr.all_steps():
    raise CheckpointError(f"no checkpoint for step {step} in {mngr.directory}; it holds steps "
                          f"{sorted(mngr.all_steps())}.")
  try:
    return _restore_step(mngr, abstract_state, step)
  except _Damaged as e:
    raise CheckpointError(
        f"checkpoint step {step} at {step_path(mngr, step)} is damaged: {e}. Choose another "
        f"step (it holds {sorted(mngr.all_steps())}) or omit the step for the newest intact "
        "one.") from None


ADAPTERS = "adapters.msgpack"
ADAPTER_CONFIG = "adapter_config.json"
_REEXPORT = ("Re-export it from the run that wrote it (train.py writes <workdir>/export/adapters) "
             "or retrain; copy an export folder whole, as written.")


def export_adapters(directory: str, trainable, cfg: AdapterConfig, extra: Optional[dict] = None) -> None:
  """Writes the trainable tree (adapters + head), the adapter config as JSON, and the SHA-256 of
  both (`checksums.json`, written last).

  Example:
    >>> export_adapters("runs/x/export", state.trainable, adapter_cfg)
    >>> trainable, cfg = load_adapters("runs/x/export")
  """
  paths.makedirs(directory)
  host = jax.device_get(trainable)
  write_bytes(paths.join(directory, ADAPTERS),
              serialization.msgpack_serialize(serialization.to_state_dict(host)))
  write_json(paths.join(directory, ADAPTER_CONFIG),
             {"adapter": cfg.to_dict(), **(extra or {})}, indent=2, sort_keys=True)
  files.write_checksums(directory, [ADAPTERS, ADAPTER_CONFIG])
  logging.info("export: adapters (%d tensors) to %s", len(flatten(host)), directory)


def load_adapters(directory: str) -> tuple[Any, AdapterConfig, dict]:
  """Reads an adapter-only export: (trainable tree, AdapterConfig, the rest of the JSON).

  Both files must resolve inside `directory` (`files.inside`) and match `checksums.json` (an
  export written before doran_jax recorded checksums has none: it loads with a warning).

  Raises:
    CheckpointError: a symlink out, a file whose checksum differs, a NaN/inf tensor (named),
      or an adapter config that is not valid (rank or alpha not a finite number > 0).
  """
  config_bytes = paths.read_bytes(inside(directory, ADAPTER_CONFIG))
  blob = paths.read_bytes(inside(directory, ADAPTERS))
  # The bytes that are checked are the bytes that are parsed.
  sums = files.read_checksums(directory, fix=_REEXPORT)
  if sums is None:
    logging.warning("adapter export %s has no %s (written before doran_jax recorded checksums): "
                    "its files cannot be verified; re-export it to add one.", directory,
                    files.CHECKSUMS)
  else:
    files.check_sha256(directory, ADAPTER_CONFIG, sums, data=config_bytes, fix=_REEXPORT)
    files.check_sha256(directory, ADAPTERS, sums, data=blob, fix=_REEXPORT)
  try:
    record = json.loads(config_bytes.decode("utf-8"))
    trainable = serialization.msgpack_restore(blob)
    adapter = record.pop("adapter")
  except Exception as e:  # msgpack and json raise assorted types on damaged bytes
    raise CheckpointError(f"adapter export {directory!r} cannot be read ({_short(e)}). "
                          f"{_REEXPORT}") from None
  where = f"adapter export {directory!r}"
  if not isinstance(adapter, dict) or not isinstance(trainable, dict):
    raise CheckpointError(f"{where}: {ADAPTER_CONFIG}'s 'adapter' or {ADAPTERS} is not a "
                          f"mapping. {_REEXPORT}")
  files.check_positive(adapter, ["rank", "alpha"], integer=["rank"],
                       source=f"{where} ({ADAPTER_CONFIG}, 'adapter')", fix=_REEXPORT)
  # A diverged run's NaNs would otherwise evaluate to a bare NaN metric with exit status 0.
  files.check_finite(flatten(trainable), source=f"{where} ({ADAPTERS})",
                     fix="Retrain (e.g. from an earlier checkpoint with a lower optim.lr) and "
                     "export again.")
  try:
    cfg = AdapterConfig.from_dict(adapter)
  except (TypeError, ValueError) as e:
    raise CheckpointError(f"{where}: {ADAPTER_CONFIG} holds an invalid adapter config ({e}). "
                          f"{_REEXPORT}") from None
  return trainable, cfg, record
