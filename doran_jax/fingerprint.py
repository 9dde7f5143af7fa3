"""Run identity: a fingerprint of everything that defines a training run, kept in <workdir>/run.json.

A run is defined by its adapter config, model, data, optimiser, schedule, steps, seed, head and
freeze lists: every config key except those that change only how a run is watched, stored or
laid out (`NOT_IDENTITY`: logging, progress, checkpoint cadence, exports, eval-only and mesh
keys). `trainer.fit` refuses a workdir whose run.json differs (a `RunMismatchError` naming each
differing key, before anything is written), unless `config.resume == "force"`, and writes
run.json once the checkpoint it resumes from has restored. The data a run trained on is also
checked after loading: the resolved step count, training-set size, class count and a digest of
the training arrays (`resolved`).

Example:
  >>> check(config, "runs/sst2")          # None (new workdir) or the stored record; raises on mismatch
  >>> record = claim(config, "runs/sst2", resolved(run.num_steps, run.train_data))  # what fit
  >>> commit("runs/sst2", record)          # ... does once the resumed checkpoint has restored
  >>> completed("runs/sst2", check(config, "runs/sst2"))   # a finished run's results, else None
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Mapping, Optional

from doran_jax import optim, paths
from doran_jax.errors import RunMismatchError
from doran_jax.files import write_json

RECORD = "run.json"
RESULTS = "results.json"
RESUME_MODES = ("auto", "force")
# Config keys (or whole sections) that do not change what is trained. adapter.mode is how the
# adapted layers are computed (the same values to float rounding), like remat: a run started in
# one mode resumes in the other (runs from before factored became the default included);
# data.target_logits_only likewise (which positions the LM head is computed at).
NOT_IDENTITY = (
    "workdir", "resume", "log_every", "progress_bar", "tensorboard", "checkpoint", "export",
    "baselines", "generate", "eval_batch_size", "mesh", "sharding_rules", "distributed",
    "model.remat", "model.fused_layers", "adapter.mode", "data.eval_split", "data.eval_limit",
    "data.eval_per_task", "data.target_logits_only",
)
# Identity keys added after run.json files already existed, with the value every older run
# implicitly had: a record without the key matches a config at that value.
ADDED_KEYS = {"data.packing": False, "data.drop_long": False}
# Resolved values added later: compared only when the stored record has them.
RESOLVED_ADDED = ("data_digest",)
MISSING = object()
# Values compared as absolute paths, so `../data` and `/work/data` are the same run.
PATH_KEYS = ("data.path", "data.data_dir", "data.train_file", "model.name", "model.tokenizer")


def _excluded(key: str) -> bool:
  return any(key == k or key.startswith(k + ".") for k in NOT_IDENTITY)


def _flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping) and value:
      out.update(_flatten(value, name + "."))
    else:
      out[name] = dict(value) if isinstance(value, Mapping) else value
  return out


def _jsonable(value):
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  if isinstance(value, Mapping):
    return {str(k): _jsonable(v) for k, v in value.items()}
  if value is None or isinstance(value, (bool, int, float, str)):
    return value
  return repr(value)


def _normal_path(value):
  if isinstance(value, str) and paths.is_remote(value):
    return value.rstrip("/")  # never a network call for the identity
  if isinstance(value, str) and value and os.path.exists(os.path.expanduser(value)):
    return os.path.abspath(os.path.expanduser(value))
  return value


def identity(config) -> dict[str, Any]:
  """The config keys that define the run, flattened ('optim.lr': 0.001, ...), JSON-ready."""
  tree = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  flat = {k: v for k, v in _flatten(tree).items()
          if k != "optim.lr_by_method" and not k.startswith("optim.lr_by_method.")}
  if "optim" in tree and "adapter" in tree:
    # The run trains at its effective lr (an unset lr is the method's table entry): that value,
    # not the whole table, identifies it.
    flat["optim.lr"] = optim.method_lr(config["optim"], config["adapter"]["method"])
  out = {}
  for key, value in sorted(flat.items()):
    if _excluded(key):
      continue
    out[key] = _jsonable(_normal_path(value) if key in PATH_KEYS else value)
  return out


def resolved(num_steps: int, train_data=None) -> dict[str, Any]:
  """What the config resolves to once the data are loaded: steps, train size, classes, and a
  digest of the training arrays (so a resume on changed data of the same size is caught)."""
  out = {"num_steps": int(num_steps)}
  if train_data is not None:
    out["train_examples"] = len(train_data)
    out["num_classes"] = train_data.num_classes
    out["data_digest"] = train_data.digest()
  return out


def resolved_differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
  """`differences` of two resolved records, worded for the data. A key the stored record lacks
  (written before the key existed, e.g. data_digest) cannot be checked and is not a difference."""
  new = {k: v for k, v in new.items() if k in old or k not in RESOLVED_ADDED}
  out = []
  for d in differences(old, new):
    if d.startswith("data_digest:"):
      out.append(f"the training data's content changed (digest {d.split(': ', 1)[1]})")
    else:
      out.append(f"resolved {d} (did the data change?)")
  return out


def digest(values: Mapping[str, Any]) -> str:
  """A short stable hash of `values` (sorted JSON)."""
  text = json.dumps(values, sort_keys=True, separators=(",", ":"))
  return hashlib.sha256(text.encode()).hexdigest()[:12]


def differing_keys(old: Mapping[str, Any], new: Mapping[str, Any]):
  """(key, old value, new value) for every differing key; `MISSING` for an absent one."""
  for key in sorted(set(old) | set(new)):
    a = old.get(key, ADDED_KEYS.get(key, MISSING))
    b = new.get(key, ADDED_KEYS.get(key, MISSING))
    if a != b:
      yield key, a, b


def differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
  """'key: old -> new' for every key whose value differs (absent keys shown as such)."""
  show = lambda v: "(absent)" if v is MISSING else json.dumps(v)
  return [f"{key}: {show(a)} -> {show(b)}" for key, a, b in differing_keys(old, new)]


def read(workdir: str) -> Optional[dict]:
  """The run.json record of `workdir`, or None when there is none."""
  path = paths.join(workdir, RECORD)
  if not paths.isfile(path):
    return None
  try:
    return json.loads(paths.read_bytes(path))
  except (OSError, ValueError) as e:
    raise RunMismatchError(
        f"{path} cannot be read ({type(e).__name__}: {e}); restore it, or continue this workdir "
        "as the current config's run with --config.resume=force.") from e


def checkpoint_steps(workdir: str) -> list[int]:
  """Steps of the committed checkpoints in <workdir>/checkpoints (orbax names them by step)."""
  folder = paths.join(workdir, "checkpoints")
  if not paths.isdir(folder):
    return []
  return sorted(int(name) for name in paths.listdir(folder) if name.isdigit())


def _resume_mode(config) -> str:
  mode = config.get("resume", "auto") if hasattr(config, "get") else "auto"
  if mode not in RESUME_MODES:
    raise RunMismatchError(f"unknown resume={mode!r}; choose one of {', '.join(RESUME_MODES)}.")
  return mode


def _mismatch(workdir, diffs, new_digest, purpose) -> RunMismatchError:
  summary = "; ".join(diffs[:3]) + (f"; ... ({len(diffs) - 3} more below)" if len(diffs) > 3 else "")
  listing = ""
  if len(diffs) > 3:
    listing = "\n" + "\n".join(f"  {d}" for d in diffs[:40])
    if len(diffs) > 40:
      listing += f"\n  ... and {len(diffs) - 40} more"
  new_dir = f"{workdir.rstrip('/')}-{new_digest[:8]}"
  if purpose == "eval":
    fix = ("Evaluate with the config the run was trained with, or pass --config.resume=force to "
           "evaluate its checkpoint under the new settings anyway.")
  else:
    fix = (f"Nothing was changed in {workdir}. For a new run pass --config.workdir={new_dir} "
           "(or --workdir); to continue this run under the new settings pass "
           "--config.resume=force.")
  return RunMismatchError(
      f"workdir {workdir} holds another run (its fingerprint does not match this run's config; "
      f"{len(diffs)} setting(s) differ, stored -> now): {summary}{listing}\n{fix}")


def check(config, workdir: str, *, purpose: str = "train") -> Optional[dict]:
  """Compares `config` with <workdir>/run.json before anything in `workdir` is touched.

  Returns the stored record (with 'differences' added: empty, or the forced ones), or None when
  the workdir holds no run (no run.json and no checkpoint).

  Raises:
    RunMismatchError: the stored run differs from `config` (each differing key listed), or the
      workdir has checkpoints but no run.json; `config.resume == "force"` lets both through.
  """
  force = _resume_mode(config) == "force"
  record = read(workdir)
  has_checkpoints = bool(checkpoint_steps(workdir))
  if record is None:
    if has_checkpoints and not force:
      raise RunMismatchError(
          f"workdir {workdir} has checkpoints but no {RECORD}, so it cannot be told whether they "
          "belong to this config (written by an older doran_jax?). If they do, pass "
          "--config.resume=force (run.json is then written from this config); otherwise pass a "
          "new --config.workdir.")
    return None
  new = identity(config)
  diffs = differences(record.get("config", {}), new)
  if diffs and not force and (has_checkpoints or purpose == "eval"):
    raise _mismatch(workdir, diffs, digest(new), purpose)
  return {**record, "differences": diffs if has_checkpoints else []}


def claim(config, workdir: str, resolved_values: Mapping[str, Any]) -> Optional[dict]:
  """`check`, then also the resolved values: the run.json record this run must write, or None
  when the stored one already describes it. Writes nothing: `fit` commits the record (`commit`)
  only once the checkpoint it resumes from has restored, so a failed forced resume leaves the
  workdir's identity as it was.

  A workdir without checkpoints holds nothing to resume, so a stale run.json there is replaced.
  """
  record = check(config, workdir)
  new = identity(config)
  force = _resume_mode(config) == "force"
  has_checkpoints = bool(checkpoint_steps(workdir))
  if record is not None and has_checkpoints:
    diffs = resolved_differences(record.get("resolved", {}), dict(resolved_values))
    if diffs and not force:
      raise _mismatch(workdir, diffs, digest(new), "train")
    if not record["differences"] and not diffs:
      return None  # the same run: run.json stays as it is
  forced = list(record.get("forced", [])) if record and has_checkpoints else []
  if record is not None and has_checkpoints:
    forced.append({"from": record.get("fingerprint"), "differences": record["differences"]})
  out = {"fingerprint": digest(new), "config": new, "resolved": dict(resolved_values)}
  if forced:
    out["forced"] = forced
  return out


def commit(workdir: str, record: Optional[dict]) -> None:
  """Writes a record from `claim` as <workdir>/run.json (None: nothing to write)."""
  if record is not None:
    paths.makedirs(workdir)
    write_json(paths.join(workdir, RECORD), record, indent=2, sort_keys=True)


def completed(workdir: str, record: Optional[dict]) -> Optional[dict]:
  """The saved results of a finished run (same fingerprint, final checkpoint, results.json).

  None when the run is new, unfinished, or continued under forced new settings.
  """
  if record is None or record.get("differences"):
    return None
  num_steps = record.get("resolved", {}).get("num_steps")
  steps = checkpoint_steps(workdir)
  path = paths.join(workdir, RESULTS)
  if num_steps is None or not steps or steps[-1] < num_steps or not paths.isfile(path):
    return None
  try:
    results = json.loads(paths.read_bytes(path))
  except (OSError, ValueError):
    return None  # an unreadable results.json is rewritten by evaluating the final checkpoint
  if results.get("status") != "done" or results.get("steps") != num_steps:
    return None
  return results
