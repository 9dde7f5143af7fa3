r"""Probes what a new user gets wrong, against configs/tiny.py, and prints one line per probe.

  PYTHONPATH=. python scripts/probe_bad_inputs.py > docs/results/probe_bad_inputs.txt

Each probe is a small function registered with `@probe(name)` that returns (verdict, message):
'clear error' (one of our UserErrors, naming the problem, with nothing damaged), 'handled'
(the right outcome without an error), or an upper-case failure verdict ('WRONG', 'UNCLEAR',
'LATE' for an error raised only after data or model had loaded). Add a probe by writing one more
function. The run needs ../shared/data (the SST-2 TSV files) and trains three tiny runs.
Exit status 1 when any probe fails.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("USE_TORCH", "0")

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from configs import tiny  # noqa: E402
from doran_jax import checkpoint, data, errors, experiment, peft_io  # noqa: E402
from doran_jax import run as run_lib  # noqa: E402
from doran_jax.adapters import AdapterConfig  # noqa: E402

SST2 = REPO.parent / "shared" / "data" / "text" / "sst2"
PROBES = []


def probe(name):
  def register(fn):
    PROBES.append((name, fn))
    return fn
  return register


def config(workdir, **overrides):
  """configs/tiny.py (text, LoRA, 4 steps, checkpoints at 2 and 4) with dotted overrides."""
  c = tiny.get_config("kind=text,method=lora")
  with c.unlocked():
    c.workdir = str(workdir)
    c.data.path = str(SST2)
    c.progress_bar = False
    c.checkpoint.max_to_keep = None
    for key, value in overrides.items():
      node = c
      *parents, leaf = key.split(".")
      for part in parents:
        node = node[part]
      node[leaf] = value
  return c


class _Loaded(Exception):
  pass


@contextlib.contextmanager
def no_loading():
  """Data or model loads raise _Loaded: an error must come before them."""
  saved = data.load_dataset, run_lib.load_model, run_lib.load_tokenizer

  def refuse(*args, **kwargs):
    raise _Loaded("data or model was loaded before the error")
  data.load_dataset = run_lib.load_model = run_lib.load_tokenizer = refuse
  try:
    yield
  finally:
    data.load_dataset, run_lib.load_model, run_lib.load_tokenizer = saved


def first_line(text) -> str:
  return str(text).strip().splitlines()[0] if str(text).strip() else ""


def expect_error(fn, cls=errors.UserError, *contains, loads=False):
  """Runs fn; a `cls` error whose message holds every `contains` string is a clear error."""
  try:
    if loads:
      fn()
    else:
      with no_loading():
        fn()
  except _Loaded as e:
    return "LATE", str(e)
  except cls as e:
    missing = [c for c in contains if c not in str(e)]
    if missing:
      return "UNCLEAR", f"message lacks {missing}: {first_line(e)}"
    return "clear error", first_line(e)
  except Exception as e:  # pylint: disable=broad-except
    return "UNCLEAR", f"{type(e).__name__}: {first_line(e)}"
  return "WRONG", "no error"


def snapshot(folder) -> dict:
  folder = pathlib.Path(folder)
  return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
          if p.is_file()}


# ------------------------------------------------------------------------------ shared runs


class Runs:
  """A trained tiny run (made once) and fresh copies of it for probes that change a workdir."""

  def __init__(self, root):
    self.root = pathlib.Path(root)
    self.trained = self.root / "trained"
    self.results = experiment.train(config(self.trained))
    self._n = 0

  def copy(self) -> pathlib.Path:
    self._n += 1
    out = self.root / f"copy{self._n}"
    shutil.copytree(self.trained, out)
    return out


def _reuse_with(runs, **change):
  workdir = runs.copy()
  before = snapshot(workdir)
  verdict, message = expect_error(lambda: experiment.run_experiment(config(workdir, **change)),
                                  errors.RunMismatchError, *change, "--config.resume=force")
  if verdict == "clear error" and snapshot(workdir) != before:
    return "LOSSY", "the error came after files in the workdir changed"
  return verdict, message


@probe("reused workdir, changed adapter.alpha")
def _(runs, tmp):
  return _reuse_with(runs, **{"adapter.alpha": 64.0})


@probe("reused workdir, changed optim.lr only")
def _(runs, tmp):
  return _reuse_with(runs, **{"optim.lr": 0.01})


@probe("eval.py on a workdir with a different adapter.alpha")
def _(runs, tmp):
  workdir = runs.copy()
  before = snapshot(workdir)
  out = expect_error(lambda: experiment.evaluate_run(config(workdir, **{"adapter.alpha": 64.0}),
                                                     workdir=str(workdir)),
                     errors.RunMismatchError, "adapter.alpha")
  return out if snapshot(workdir) == before else ("LOSSY", "eval_step<N>.json was written")


@probe("rerun of a finished run (no-op)")
def _(runs, tmp):
  workdir = runs.copy()
  before = snapshot(workdir)
  with no_loading():
    out = experiment.run_experiment(config(workdir))
  if out["status"] != "complete" or snapshot(workdir) != before:
    return "WRONG", f"status {out['status']}; files changed: {snapshot(workdir) != before}"
  return "handled", (f"status 'complete', results.json untouched (train_minutes "
                     f"{out['train_minutes']:.3f} kept)")


@probe("forced resume with more steps (--config.resume=force)")
def _(runs, tmp):
  workdir = runs.copy()
  out = experiment.train(config(workdir, num_steps=6, resume="force"))
  steps = [h["step"] for h in out["history"]]
  if out["status"] != "done" or steps != [5, 6]:
    return "WRONG", f"status {out['status']}, trained steps {steps}"
  return "handled", "resumed at step 4 and trained steps 5-6 under the new settings"


@probe("metrics.jsonl after a resume from an older checkpoint")
def _(runs, tmp):
  workdir = runs.copy()
  shutil.rmtree(workdir / "checkpoints" / "4")   # a crash after step 4, last save at step 2
  os.remove(workdir / "results.json")
  experiment.train(config(workdir))
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  steps = [r["step"] for r in records if "train/loss" in r]
  if steps != [1, 2, 3, 4]:
    return "WRONG", f"train records for steps {steps}"
  return "handled", "truncated to step 2 on resume: one record per step (1, 2, 3, 4)"


@probe("workdir with checkpoints but no run.json")
def _(runs, tmp):
  workdir = runs.copy()
  os.remove(workdir / "run.json")
  return expect_error(lambda: experiment.train(config(workdir)), errors.RunMismatchError,
                      "--config.resume=force")


@probe("eval.py on a workdir that does not exist")
def _(runs, tmp):
  missing = pathlib.Path(tmp) / "no_such_run"
  out = expect_error(lambda: experiment.evaluate_run(config(missing), workdir=str(missing)),
                     errors.CheckpointError, "does not exist")
  return out if not missing.exists() else ("WRONG", f"{missing} was created")


# --------------------------------------------------------------------------- config values


def _invalid(key, value, *contains, **extra):
  def run(runs, tmp):
    workdir = pathlib.Path(tmp) / f"invalid_{key}"
    c = config(workdir, **{key: value}, **extra)
    out = expect_error(lambda: experiment.run_experiment(c), errors.ConfigError, key, *contains)
    return out if not workdir.exists() else ("WRONG", f"{workdir} was written")
  return run


for _key, _value, _more in [
    ("num_steps", -5, ()), ("adapter.alpha", 0.0, ()), ("checkpoint.max_to_keep", 0, ()),
    ("checkpoint.every", 0, ()), ("optim.accum_steps", 3, ("batch_size=8",)),
    ("adapter.method", "dorra", ("dorra",)), ("optim.lr", float("nan"), ()),
    ("optim.lr", -1e-3, ()), ("eval_batch_size", 0, ()), ("optim.warmup_steps", 10, ()),
    ("adapter.mode", "fused", ()), ("data.path", "/no/such/folder", ()),
    ("data.format", "glue", ()), ("mesh", "data:0", ()),
    ("model.task", "causal_lm", ()), ("resume", "yes", ())]:
  probe(f"config {_key}={_value!r}")(_invalid(_key, _value, *_more))


@probe("config num_epochs=0 with num_steps=0")
def _(runs, tmp):
  return _invalid("num_epochs", 0.0, num_steps=0)(runs, tmp)


# ------------------------------------------------------------------------------------- data


def _tsv(tmp, name, train, dev=b"1\tok\n"):
  folder = pathlib.Path(tmp) / name
  folder.mkdir()
  (folder / "train.tsv").write_bytes(train)
  (folder / "dev.tsv").write_bytes(dev)
  return folder


@probe("dev set with a label the training set lacks")
def _(runs, tmp):
  rows = b"".join(f"{i % 2}\tsentence {i}\n".encode() for i in range(16))
  folder = _tsv(tmp, "dev_label", rows, rows + b"2\ta third kind\n")
  c = config(pathlib.Path(tmp) / "dev_label_run", **{"data.path": str(folder), "data.limit": None,
                                                     "data.eval_limit": None})

  def refuse(*args, **kwargs):
    raise _Loaded("the model was loaded before the label check")

  def run():
    saved, run_lib.load_model = run_lib.load_model, refuse
    try:
      run_lib.setup(c)
    finally:
      run_lib.load_model = saved
  # The data must load here (the labels are in it); the model must not.
  return expect_error(run, errors.DataError, "[2]", "dev.tsv", loads=True)


@probe("non-UTF-8 TSV")
def _(runs, tmp):
  folder = _tsv(tmp, "latin1", b"1\tfine\n0\tcaf\xe9 au lait\n")
  return expect_error(lambda: data.read_tsv(str(folder / "train.tsv"), "sst2"), errors.DataError,
                      "train.tsv:2", "UTF-8")


@probe("TSV row with 3 columns")
def _(runs, tmp):
  folder = _tsv(tmp, "three", b"0\ttwo\tparts\n")
  return expect_error(lambda: data.read_tsv(str(folder / "train.tsv"), "sst2"), errors.DataError,
                      "train.tsv:1", "3 tab-separated", "'cola' is sentence<TAB>label")


# ---------------------------------------------------------------------------------- exports


@probe("load_peft_adapter on our own export")
def _(runs, tmp):
  folder = runs.trained / "export" / "adapters"
  return expect_error(lambda: peft_io.load_peft_adapter(str(folder), {}), errors.UserError,
                      "doran_jax adapter export", "checkpoint.load_adapters")


@probe("save_peft_adapter into export/adapters")
def _(runs, tmp):
  folder = runs.copy() / "export" / "adapters"
  before = snapshot(folder)
  out = expect_error(lambda: peft_io.save_peft_adapter(
      str(folder), {}, {}, AdapterConfig(method="lora", rank=4), base_model_name_or_path="base"),
      errors.UserError, "would overwrite")
  return out if snapshot(folder) == before else ("LOSSY", "our adapter_config.json was overwritten")


# ------------------------------------------------------------------------------ entry points


@probe("train.py with a bad value: one line, exit 2")
def _(runs, tmp):
  proc = subprocess.run(
      [sys.executable, "train.py", "--config", "configs/tiny.py", f"--config.data.path={SST2}",
       f"--config.workdir={pathlib.Path(tmp) / 'cli'}", "--config.checkpoint.every=0"],
      cwd=REPO, capture_output=True, text=True, timeout=600,
      env={**os.environ, "DORAN_VERBOSE": "0"})
  last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ""
  if proc.returncode != errors.EXIT_CODE or "Traceback" in proc.stderr:
    return "UNCLEAR", f"exit {proc.returncode}, traceback: {'Traceback' in proc.stderr}"
  return "clear error", last


def main():
  t0 = time.time()
  failed = 0
  with tempfile.TemporaryDirectory() as tmp:
    with contextlib.redirect_stdout(io.StringIO()):
      runs = Runs(tmp)
    for name, fn in PROBES:
      try:
        with contextlib.redirect_stdout(io.StringIO()):  # the runs' own progress lines
          verdict, message = fn(runs, tmp)
      except Exception as e:  # pylint: disable=broad-except
        verdict, message = "PROBE FAILED", f"{type(e).__name__}: {first_line(e)}"
      failed += verdict not in ("clear error", "handled")
      print(f"{name} | {verdict} | {message}", flush=True)
  print(f"# {len(PROBES)} probes, {len(PROBES) - failed} clear or handled, {failed} not; "
        f"{time.time() - t0:.0f} s", flush=True)
  return 1 if failed else 0


if __name__ == "__main__":
  np.set_printoptions(precision=4)
  sys.exit(main())
