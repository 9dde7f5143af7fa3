"""One writer per workdir: an exclusive lock file, <workdir>/run.lock, held while a run trains.

Two runs writing one workdir (the same command started twice, a job resubmitted while the first
still runs, a stopped process resumed) delete each other's checkpoints and interleave their
metrics. The lock is a file created with O_EXCL naming its holder (host, PID and the process's
start time); a second writer gets a `WorkdirBusyError` naming the holder before anything in the
workdir is touched. The lock goes when the holder exits (also on an error or SIGTERM); a holder
that was killed (SIGKILL, OOM) leaves it behind, and the next run on the same host sees that
the process is gone and takes it over. A lock from another host cannot be checked: the message
says which file to delete once that run is known to be dead. Taking the lock again in the
process that holds it is a no-op (run_experiment -> train -> fit).

In a bucket (a gs:// workdir) there is no O_EXCL or O_NOFOLLOW: the lock is an object uploaded
only if none is there (`paths.write_bytes(create=True)`: an ifGenerationMatch=0 precondition
with gcsfs, which gcsfs calls experimental; fsspec filesystems without a create mode check, then
write), then read back to see that it is ours. Best effort, then: two runs starting within the
same second on a filesystem without an atomic create may both think they hold it. An upload
appears whole or not at all, so a bucket lock is never torn; a stale one (its holder killed) is
taken over on the same host as locally, and one from another host names the URL to delete.

Example:
  >>> with held("runs/sst2"):              # what experiment.train and trainer.fit do
  ...   ...                                # train, evaluate, export
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import time
from typing import Optional

from absl import logging

from doran_jax import paths
from doran_jax.errors import PREEMPTED_EXIT_CODE, WorkdirBusyError

LOCK = "run.lock"
# A lock file still empty this long after it was created is a holder killed mid-write.
_TORN_AFTER_S = 60.0


def _start_time(pid: int) -> Optional[str]:
  """The process's start time in clock ticks since boot (Linux /proc), None where unknown; with
  the PID it tells a live holder from a new process that reused a dead holder's PID."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      # The command name (field 2) may hold spaces; the fields after its ')' are fixed.
      return f.read().rsplit(")", 1)[1].split()[19]
  except (OSError, IndexError):
    return None


def holder(pid: Optional[int] = None) -> dict:
  """The lock record of process `pid` (default: this one)."""
  pid = os.getpid() if pid is None else pid
  return {"host": socket.gethostname(), "pid": pid, "start": _start_time(pid),
          "since": time.strftime("%Y-%m-%d %H:%M:%S")}


def _same(a: dict, b: dict) -> bool:
  return (a.get("host"), a.get("pid"), a.get("start")) == (b.get("host"), b.get("pid"),
                                                           b.get("start"))


def _alive(record: dict) -> bool:
  """Whether the holder (on this host) still runs: its PID exists with the same start time."""
  pid = record.get("pid")
  if not isinstance(pid, int) or pid <= 0:
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    pass  # another user's live process
  start = _start_time(pid)
  return record.get("start") is None or start is None or start == record.get("start")


def read(workdir: str) -> Optional[dict]:
  """The lock record of `workdir` ({} for an unreadable one), or None when it is not locked."""
  path = paths.join(workdir, LOCK)
  if paths.is_remote(path):
    try:
      return _record(paths.read_bytes(path))
    except FileNotFoundError:
      return None
  try:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
  except FileNotFoundError:
    return None
  except OSError:
    return {}  # a symlink or something else planted there: not a lock we can trust
  with os.fdopen(fd, "rb") as f:
    return _record(f.read())


def _record(data: bytes) -> dict:
  try:
    record = json.loads(data)
  except ValueError:
    return {}
  return record if isinstance(record, dict) else {}


def _busy(workdir: str, record: dict) -> WorkdirBusyError:
  path = paths.join(workdir, LOCK)
  who = (f"process {record.get('pid')} on host {record.get('host')} (since {record.get('since')})"
         if record else "a lock file that cannot be read")
  if record and record.get("host") == socket.gethostname():
    fix = "Wait for it to finish, or stop it (SIGTERM saves a checkpoint) and rerun to resume."
  else:
    fix = (f"If that run is no longer running (a crashed job on another node), delete {path} "
           "and rerun.")
  return WorkdirBusyError(f"workdir {workdir} is in use by another run: {who} holds {path}. Two "
                          f"runs in one workdir would delete each other's checkpoints. {fix} For "
                          "a separate run pass another --config.workdir.")


def _stale(workdir: str, record: dict) -> bool:
  """A lock left by a holder that is gone: same host and not alive, or torn and old."""
  if not record:
    path = paths.join(workdir, LOCK)
    if paths.is_remote(path):
      return not paths.exists(path)  # uploads are never torn: an unreadable lock is not ours
    try:
      return (not os.path.islink(path) and
              time.time() - os.lstat(path).st_mtime > _TORN_AFTER_S)
    except FileNotFoundError:
      return True
  return record.get("host") == socket.gethostname() and not _alive(record)


def acquire(workdir: str) -> dict:
  """Takes the lock of `workdir` for this process (creating the folder); returns its record.

  Raises:
    WorkdirBusyError: another live process holds it, or a host this one cannot check does.
  """
  paths.makedirs(workdir)
  path = paths.join(workdir, LOCK)
  me = holder()
  if paths.is_remote(path):
    return _acquire_url(workdir, path, me)
  for _ in range(2):
    try:
      fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    except FileExistsError:
      _remove_if_stale(workdir, path, os.remove)
      continue
    with os.fdopen(fd, "w") as f:
      json.dump(me, f)
    return me
  raise _busy(workdir, read(workdir) or {})


def _remove_if_stale(workdir: str, path: str, remove) -> None:
  """Removes the lock at `path` if its holder is gone, else raises WorkdirBusyError."""
  record = read(workdir) or {}
  if not _stale(workdir, record):
    raise _busy(workdir, record) from None
  logging.warning("removing the stale lock %s of %s (that process is gone).", path,
                  f"process {record.get('pid')}" if record else "an unreadable holder")
  with contextlib.suppress(FileNotFoundError):
    remove(path)


def _acquire_url(workdir: str, path: str, me: dict) -> dict:
  """`acquire` in a bucket: create-if-absent, then read back (see the module docstring)."""
  for _ in range(2):
    try:
      paths.write_bytes(path, json.dumps(me).encode(), create=True)
    except FileExistsError:
      _remove_if_stale(workdir, path, paths.remove)
      continue
    now = read(workdir)
    if now is None or not _same(now, me):
      raise _busy(workdir, now or {})  # another run wrote it between our check and our write
    return me
  raise _busy(workdir, read(workdir) or {})


def release(workdir: str, record: dict) -> None:
  """Removes the lock of `workdir` if `record` still holds it (never another run's)."""
  held_now = read(workdir)
  if held_now and _same(held_now, record):
    with contextlib.suppress(FileNotFoundError):
      paths.remove(paths.join(workdir, LOCK))


@contextlib.contextmanager
def held(workdir: str, *, enabled: bool = True):
  """Holds the lock of `workdir` inside the block; a no-op when this process already holds it
  or `enabled` is False (processes other than 0 of a multi-host run)."""
  current = read(workdir) if enabled else None
  if not enabled or (current and _same(current, holder())):
    yield
    return
  record = acquire(workdir)
  try:
    with _sigterm_unwinds():
      yield
  finally:
    release(workdir, record)


@contextlib.contextmanager
def _sigterm_unwinds():
  """SIGTERM inside the block exits through `finally` (the lock is released) with the preempted
  exit code, instead of Python's default of dying on the spot with the lock left behind.

  The training loop installs its own handler (save, then stop) while it runs; this one covers the
  rest of a run: loading the model, the zero-shot evaluation, the exports after training.
  """
  def handle(signum, frame):
    del signum, frame
    logging.warning("SIGTERM received outside the training loop: stopping without a new "
                    "checkpoint (the last saved one, if any, is kept); rerun the same command to "
                    "resume.")
    raise SystemExit(PREEMPTED_EXIT_CODE)

  try:
    previous = signal.signal(signal.SIGTERM, handle)
  except ValueError:  # not the main thread: leave signals to whoever owns them
    yield
    return
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, previous)
