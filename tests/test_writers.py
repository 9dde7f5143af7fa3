"""No result file or export is ever written through a symlink (issue 32).

Two walks over every writer: statically, each place in doran_jax/ that opens a file for writing
is one the project knows to be safe (so a new writer needs a look); dynamically, a real run
(train, export with the merged model, eval of the checkpoint and of the export) in a workdir where
every file it writes is planted in advance as a symlink to a file of someone else's: each is
refused by name, and no planted target ever changes.
"""

import ast
import os
import pathlib
import shutil

import pytest

from doran_jax import errors, experiment, workdir_lock
from test_trainer import tiny_config

REPO = pathlib.Path(__file__).resolve().parents[1]

# Every write in doran_jax/ outside files.py and paths.py, and why it is safe (file:function ->
# reason).
KNOWN_WRITERS = {
    "doran_jax/workdir_lock.py:acquire": "os.open with O_CREAT | O_EXCL | O_NOFOLLOW",
    "doran_jax/models/hf_io.py:save_pretrained": "save_file into files.replacing's temp file",
    "doran_jax/peft_io.py:save_peft_adapter": "save_file into files.replacing's temp file",
    "doran_jax/checkpoint.py:_set_aside": "os.rename of a damaged step dir inside checkpoints/",
    "doran_jax/models/__init__.py:save_pretrained": (
        "tokenizer.save_pretrained into a folder check_output_folder accepted"),
    "doran_jax/workdir_lock.py:_acquire_url": (
        "paths.write_bytes(create=True): uploads the lock only where none exists"),
    "doran_jax/models/tokenizer.py:local_copy": "paths.download into a fresh mkdtemp folder",
}
_WRITE_CALLS = {("os", "rename"), ("os", "replace"), ("np", "save"), ("np", "savez"),
                ("np", "savetxt"), ("json", "dump"), ("tokenizer", "save_pretrained"),
                ("shutil", "copy"), ("shutil", "copyfile"), ("shutil", "move")}
_WRITE_METHODS = {"write_text", "write_bytes", "tofile"}  # pathlib's and NumPy's
_PATHS_WRITES = {"write_bytes", "upload", "download", "move"}  # doran_jax.paths' writers


def _writes(call: ast.Call) -> bool:
  func = call.func
  if isinstance(func, ast.Name) and func.id == "open":
    mode = call.args[1] if len(call.args) > 1 else next(
        (k.value for k in call.keywords if k.arg == "mode"), None)
    return isinstance(mode, ast.Constant) and any(c in str(mode.value) for c in "wax+")
  if isinstance(func, ast.Name):
    return func.id == "save_file"  # safetensors'; files.write_* are the safe ones
  if not isinstance(func, ast.Attribute):
    return False
  owner = func.value.id if isinstance(func.value, ast.Name) else None
  if owner == "files":
    return False
  if owner == "paths":
    return func.attr in _PATHS_WRITES
  if (owner, func.attr) == ("os", "open"):
    flags = {n.attr for a in call.args[1:2] for n in ast.walk(a) if isinstance(n, ast.Attribute)}
    return bool(flags & {"O_WRONLY", "O_RDWR", "O_CREAT", "O_APPEND", "O_TRUNC"})
  return (owner, func.attr) in _WRITE_CALLS or func.attr in _WRITE_METHODS


def _writer_sites() -> set[str]:
  sites = set()
  for path in sorted((REPO / "doran_jax").rglob("*.py")):
    rel = str(path.relative_to(REPO))
    if rel in ("doran_jax/files.py", "doran_jax/paths.py"):  # the safe layer and its filesystems
      continue
    tree = ast.parse(path.read_text())
    for fn in ast.walk(tree):
      if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
        for node in ast.walk(fn):
          if isinstance(node, ast.Call) and _writes(node):
            sites.add(f"{rel}:{fn.name}")
  return sites


def test_every_write_in_the_library_is_a_known_safe_one():
  sites = _writer_sites()
  assert sites - set(KNOWN_WRITERS) == set(), (
      "new code writes files without doran_jax.files (write_json/write_text/write_bytes/"
      "replacing/append_text): use those, or add the site to KNOWN_WRITERS with why it is safe")
  assert set(KNOWN_WRITERS) - sites == set(), "KNOWN_WRITERS lists a site that no longer writes"


def _run_everything(config, workdir: pathlib.Path):
  """What a user does with a run: train (with the merged export), eval the checkpoint, eval the
  adapter export."""
  experiment.train(config, str(workdir))
  experiment.evaluate_run(config, workdir=str(workdir))
  experiment.evaluate_run(config, adapters_dir=str(workdir / "export" / "adapters"))


@pytest.mark.slow
def test_a_run_never_writes_through_a_planted_symlink(shared_data, tmp_path):
  """~1 min: one run per planted file (the later ones only evaluate and export)."""
  def config(workdir):
    return tiny_config(shared_data, workdir, "kind=text,method=lora",
                       **{"num_steps": 2, "checkpoint.every": 2, "export.merged": True,
                          "data.eval_limit": 8})
  clean = tmp_path / "clean"
  _run_everything(config(clean), clean)
  written = sorted(str(p.relative_to(clean)) for p in clean.rglob("*")
                   if p.is_file() and "checkpoints" not in p.parts)
  assert {"run.json", "metrics.jsonl", "results.json", "eval_step2.json",
          "export/adapters/eval.json", "export/merged/config.json"} <= set(written)
  written.append(workdir_lock.LOCK)  # held during the run, gone after it

  # Someone else's files, each behind a symlink at a name the run writes.
  victims = tmp_path / "victims"
  victims.mkdir()
  workdir = tmp_path / "run"
  for i, rel in enumerate(written):
    (victims / f"{i}.txt").write_text(f"precious {i}")
    (workdir / rel).parent.mkdir(parents=True, exist_ok=True)
    os.symlink(victims / f"{i}.txt", workdir / rel)
  refused = []
  for _ in range(len(written) + 1):
    try:
      _run_everything(config(workdir), workdir)
      break
    except errors.UserError as e:
      named = [rel for rel in written if str(workdir / rel) in str(e)
               and os.path.islink(workdir / rel)]
      assert len(named) == 1, f"the refusal names no planted file: {e}"
      refused.append(named[0])
      os.remove(workdir / named[0])  # the user removes the link; the next writer is tried
  remaining = [rel for rel in written if os.path.islink(workdir / rel)]
  assert remaining == [], f"never written, or written beside the link: {remaining}"
  # save_pretrained first clears a previous save's weights from the run's own export/merged
  # (removing a link there removes the link, never its target); every other name is refused.
  assert set(written) - set(refused) == {"export/merged/model.safetensors"}, refused
  for i in range(len(written)):
    assert (victims / f"{i}.txt").read_text() == f"precious {i}"
  shutil.rmtree(tmp_path / "clean")
