"""Checkpoint integrity: checksums written with each save and verified on restore, fallback to the
newest intact step (nothing deleted), retention that never drops the newest intact step."""

import logging
import os
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from doran_jax import checkpoint, errors, sharding, trainer
from doran_jax import run as run_lib
from test_trainer import tiny_config


def _numpy_checksum(x: np.ndarray) -> str:
  """Independent reference: plain and (2i+1)-weighted sums of the bit patterns, mod 2**32."""
  x = np.asarray(x)
  if x.dtype == np.bool_:
    words = x.astype(np.uint64).ravel()
  else:
    words = x.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[x.dtype.itemsize]).astype(np.uint64).ravel()
  weights = 2 * np.arange(words.size, dtype=np.uint64) + 1
  plain = int(words.sum()) % 2**32
  weighted = int(sum(int(w) * int(v) for w, v in zip(words, weights))) % 2**32
  return f"{plain:08x}{weighted:08x}"


def test_array_checksums_match_a_numpy_reference():
  rng = np.random.default_rng(0)
  tree = {
      "f32": rng.normal(size=(3, 5)).astype(np.float32) * 1e3,
      "bf16": jnp.asarray(rng.normal(size=(4, 7)), jnp.bfloat16),
      "i32": rng.integers(-2**31, 2**31 - 1, size=(6,), dtype=np.int32),
      "u32": rng.integers(0, 2**32 - 1, size=(2, 2, 3), dtype=np.uint32),
      "i8": rng.integers(-128, 127, size=(9,), dtype=np.int8),
      "flag": rng.random((4,)) > 0.5,
      "scalar": np.float32(0.711),
  }
  ours = checkpoint.array_checksums(tree)
  for key, value in tree.items():
    assert ours[key] == _numpy_checksum(np.asarray(value)), key
  # One changed element (a single flipped bit) changes the checksum; so does swapping two.
  flipped = tree["f32"].copy()
  flipped.view(np.uint32)[1, 2] ^= 1
  assert checkpoint.array_checksums({"f32": flipped})["f32"] != ours["f32"]
  swapped = tree["f32"].copy()
  swapped[0, 0], swapped[2, 4] = swapped[2, 4], swapped[0, 0]
  assert checkpoint.array_checksums({"f32": swapped})["f32"] != ours["f32"]


@pytest.fixture(scope="module")
def trained(shared_data, tmp_path_factory):
  """A tiny run paused at step 4 of 6 with checkpoints at steps 2 and 4, and its losses."""
  workdir = tmp_path_factory.mktemp("integrity") / "run"
  config = tiny_config(shared_data, workdir, "kind=text,method=doran", num_steps=6)
  run = run_lib.setup(config)
  out = trainer.fit(run, str(workdir), max_steps=4)
  assert out["status"] == "paused"
  assert checkpoint.manager(str(workdir / "checkpoints")).all_steps() == [2, 4]
  return run, workdir, [h["loss"] for h in out["history"]]


def _copy(workdir, tmp_path):
  target = tmp_path / "run"
  shutil.copytree(workdir, target)
  return target


def _files(root) -> dict:
  return {os.path.relpath(os.path.join(r, f), root): pathlib.Path(r, f).read_bytes()
          for r, _, names in os.walk(root) for f in names}


def _zero(path):
  with open(path, "r+b") as f:
    f.write(b"\0" * os.path.getsize(path))


def _data_files(step_dir):
  """The state's array data files (OCDBT), largest first."""
  found = [os.path.join(r, f) for r, _, names in os.walk(os.path.join(step_dir, "state"))
           for f in names if os.path.basename(r) == "d"]
  return sorted(found, key=os.path.getsize, reverse=True)


def _raw_restore(step_dir, abstract):
  """Orbax's own restore of one step, with no checksum check (None if it fails)."""
  import orbax.checkpoint as ocp
  mngr = checkpoint.manager(os.path.dirname(step_dir))
  try:
    return mngr.restore(int(os.path.basename(step_dir)), args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract)))["state"]
  except Exception:  # pylint: disable=broad-except
    return None
  finally:
    mngr.close()


def _changed_leaves(a, b) -> int:
  return sum(not np.array_equal(np.asarray(x), np.asarray(y))
             for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def _flip_bytes_of_an_array(step_dir, reference, abstract):
  """Flips 4 bytes of the largest array data file where orbax still restores without error but
  hands back changed values: the silent corruption only a checksum catches."""
  path = _data_files(step_dir)[0]
  clean = pathlib.Path(path).read_bytes()
  for frac in (0.3, 0.6, 0.45, 0.75, 0.15, 0.5, 0.35, 0.65):
    blob = bytearray(clean)
    at = int(len(blob) * frac)
    blob[at:at + 4] = bytes(b ^ 0x01 for b in blob[at:at + 4])
    with open(path, "wb") as f:
      f.write(bytes(blob))
    raw = _raw_restore(step_dir, abstract)
    if raw is not None and _changed_leaves(raw, reference):
      return path
  raise AssertionError(f"no silent 4-byte corruption found in {path}")


def _restored(workdir, run):
  mngr = checkpoint.manager(str(workdir / "checkpoints"))
  try:
    return checkpoint.restore_newest_intact(mngr, sharding.abstract(run.state))
  finally:
    mngr.close()


DAMAGE = {
    "missing array metadata": lambda d, *_: os.remove(os.path.join(d, "state", "_METADATA")),
    "missing step metadata": lambda d, *_: os.remove(os.path.join(d, "_CHECKPOINT_METADATA")),
    "missing checksum record": lambda d, *_: os.remove(os.path.join(d, "integrity", "metadata")),
    "truncated array file": lambda d, *_: os.truncate(_data_files(d)[0], 100),
    "zeroed files": lambda d, *_: [_zero(os.path.join(r, f)) for r, _, fs in os.walk(d) for f in fs],
    "flipped array bytes": _flip_bytes_of_an_array,
}
REASON = {
    "missing array metadata": "the state's array metadata is missing",
    "missing step metadata": "the step metadata is missing",
    "missing checksum record": "the checksum record is missing",
    "truncated array file": "cannot be read",
    "zeroed files": "is not valid JSON",
    "flipped array bytes": "checksum mismatch in 1 of",
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_latest_falls_back_to_previous_step(trained, tmp_path, caplog, damage):
  run, workdir, _ = trained
  work = _copy(workdir, tmp_path)
  reference, _, _ = _restored(work, run)  # step 4, intact
  assert int(reference.step) == 4
  DAMAGE[damage](str(work / "checkpoints" / "4"), reference, sharding.abstract(run.state))
  before = _files(work)
  with caplog.at_level(logging.WARNING):
    state, meta, damaged = _restored(work, run)
  assert int(state.step) == 2 and meta["data_step"] == 2
  assert list(damaged) == [4] and REASON[damage] in damaged[4]
  lines = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
  assert len(lines) == 1 and "\n" not in lines[0]
  assert f"checkpoint step 4 at {work / 'checkpoints' / '4'} is damaged" in lines[0]
  assert REASON[damage] in lines[0] and "falling back to step 2 (nothing deleted)" in lines[0]
  assert _files(work) == before  # restore reads only: nothing deleted, moved or rewritten


def test_flipped_bytes_restore_silently_without_the_checksum(trained, tmp_path):
  """The flipped bytes really reach the arrays: orbax alone hands them back without an error."""
  run, workdir, _ = trained
  work = _copy(workdir, tmp_path)
  reference, _, _ = _restored(work, run)
  step_dir = str(work / "checkpoints" / "4")
  _flip_bytes_of_an_array(step_dir, reference, sharding.abstract(run.state))
  raw = _raw_restore(step_dir, sharding.abstract(run.state))
  assert raw is not None and _changed_leaves(raw, reference) >= 1
  with pytest.raises(errors.CheckpointError, match="checksum mismatch"):
    mngr = checkpoint.manager(str(work / "checkpoints"))
    try:
      checkpoint.restore(mngr, sharding.abstract(run.state), 4)
    finally:
      mngr.close()


def test_no_intact_checkpoint_is_a_clear_error_listing_each_step(trained, tmp_path):
  run, workdir, _ = trained
  work = _copy(workdir, tmp_path)
  reference, _, _ = _restored(work, run)
  _flip_bytes_of_an_array(str(work / "checkpoints" / "4"), reference,
                          sharding.abstract(run.state))
  os.remove(work / "checkpoints" / "2" / "integrity" / "metadata")
  with pytest.raises(errors.CheckpointError) as info:
    _restored(work, run)
  message = str(info.value)
  assert f"no intact checkpoint in {work / 'checkpoints'}" in message
  assert "step 4 (" in message and "checksum mismatch" in message
  assert "step 2 (" in message and "the checksum record is missing" in message
  assert "Nothing was deleted" in message and "--workdir" in message
  assert sorted(os.listdir(work / "checkpoints")) == ["2", "4"]


def test_explicit_damaged_step_is_an_error_not_a_fallback(trained, tmp_path):
  run, workdir, _ = trained
  work = _copy(workdir, tmp_path)
  os.remove(work / "checkpoints" / "4" / "meta" / "metadata")
  mngr = checkpoint.manager(str(work / "checkpoints"))
  with pytest.raises(errors.CheckpointError, match=r"checkpoint step 4 at .* is damaged: the "
                     r"data-position record is missing"):
    checkpoint.restore(mngr, sharding.abstract(run.state), 4)
  state, _ = checkpoint.restore(mngr, sharding.abstract(run.state), 2)
  assert int(state.step) == 2
  mngr.close()


def test_prune_never_deletes_the_newest_intact_step(trained, tmp_path):
  run, workdir, _ = trained
  work = _copy(workdir, tmp_path)
  ckpts = str(work / "checkpoints")
  # Structurally damaged newest (no checksum record): neither counted nor deleted.
  shutil.copytree(work, tmp_path / "flipped")
  os.remove(work / "checkpoints" / "4" / "integrity" / "metadata")
  mngr = checkpoint.manager(ckpts)
  assert checkpoint.prune(mngr, 1) == [] and mngr.all_steps() == [2, 4]
  mngr.close()
  # Damaged in its arrays only (found on restore): `damaged` keeps it from counting.
  flipped = str(tmp_path / "flipped" / "checkpoints")
  reference, _, _ = _restored(tmp_path / "flipped", run)
  _flip_bytes_of_an_array(os.path.join(flipped, "4"), reference, sharding.abstract(run.state))
  mngr = checkpoint.manager(flipped)
  _, _, damaged = checkpoint.restore_newest_intact(mngr, sharding.abstract(run.state))
  assert checkpoint.prune(mngr, 1, damaged) == [] and mngr.all_steps() == [2, 4]
  # Both intact: the older one goes.
  mngr.close()
  intact = _copy(workdir, tmp_path / "intact")
  mngr = checkpoint.manager(str(intact / "checkpoints"))
  assert checkpoint.prune(mngr, 1) == [2] and mngr.all_steps() == [4]
  mngr.close()


def test_resume_skips_a_damaged_step_trains_on_and_keeps_its_files(trained, tmp_path, capsys):
  """Resume from step 2 past a corrupt step 4: the run repeats steps 3-4 exactly (no NaN guard,
  no lr blamed), moves the damaged step aside when it saves step 4 again, and prunes only
  intact steps."""
  run, workdir, losses = trained
  work = _copy(workdir, tmp_path)
  reference, _, _ = _restored(work, run)
  _flip_bytes_of_an_array(str(work / "checkpoints" / "4"), reference,
                          sharding.abstract(run.state))
  damaged_files = _files(work / "checkpoints" / "4")
  out = trainer.fit(run, str(work))
  assert out["status"] == "done"
  text = capsys.readouterr().out
  assert "resumed from step 2" in text and "skipped damaged step(s) [4]" in text
  resumed = [h["loss"] for h in out["history"]]
  assert len(resumed) == 4 and all(np.isfinite(resumed))
  np.testing.assert_array_equal(resumed[:2], losses[2:4])
  assert _files(work / "checkpoints" / "damaged" / "4") == damaged_files
  mngr = checkpoint.manager(str(work / "checkpoints"))
  assert mngr.all_steps() == [4, 6]  # max_to_keep=2 of the intact ones
  state, _ = checkpoint.restore(mngr, sharding.abstract(run.state))
  assert int(state.step) == 6
  mngr.close()
