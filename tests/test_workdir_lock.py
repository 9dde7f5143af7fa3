"""One writer per workdir (doran_jax.workdir_lock): a second run is refused, a dead one's lock is
taken over, a lock on another host names the file to delete."""

import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import time

import pytest

from doran_jax import errors, experiment, workdir_lock
from test_run_identity import _config, _snapshot

REPO = pathlib.Path(__file__).resolve().parents[1]


def _plant(workdir, record):
  os.makedirs(workdir, exist_ok=True)
  (workdir / workdir_lock.LOCK).write_text(json.dumps(record))


def _dead_pid() -> int:
  proc = subprocess.Popen([sys.executable, "-c", "pass"])
  proc.wait()
  return proc.pid


def test_a_live_holder_refuses_a_second_writer(tmp_path):
  # The pytest process's parent is alive on this host and is not us.
  _plant(tmp_path, workdir_lock.holder(os.getppid()))
  with pytest.raises(errors.WorkdirBusyError,
                     match=rf"in use by another run: process {os.getppid()} on host .*Wait for it"):
    workdir_lock.acquire(str(tmp_path))
  assert workdir_lock.read(str(tmp_path))["pid"] == os.getppid()  # left as it was


def test_a_dead_holders_lock_is_taken_over(tmp_path):
  _plant(tmp_path, workdir_lock.holder(_dead_pid()))
  record = workdir_lock.acquire(str(tmp_path))
  assert record["pid"] == os.getpid() and workdir_lock.read(str(tmp_path))["pid"] == os.getpid()
  workdir_lock.release(str(tmp_path), record)
  assert workdir_lock.read(str(tmp_path)) is None


def test_a_reused_pid_is_not_the_holder(tmp_path):
  # The holder's PID now belongs to another process (its start time differs): stale.
  stale = {**workdir_lock.holder(os.getppid()), "start": "1"}
  _plant(tmp_path, stale)
  workdir_lock.release(str(tmp_path), workdir_lock.acquire(str(tmp_path)))


def test_a_lock_from_another_host_names_the_file_to_delete(tmp_path):
  _plant(tmp_path, {"host": socket.gethostname() + "-elsewhere", "pid": 1, "start": "5"})
  with pytest.raises(errors.WorkdirBusyError, match=r"no longer running.*delete .*run\.lock"):
    workdir_lock.acquire(str(tmp_path))


def test_a_torn_lock_is_busy_while_fresh_and_stale_when_old(tmp_path):
  path = tmp_path / workdir_lock.LOCK
  path.write_text("")  # a holder killed between create and write
  with pytest.raises(errors.WorkdirBusyError, match="cannot be read"):
    workdir_lock.acquire(str(tmp_path))
  old = time.time() - 3600
  os.utime(path, (old, old))
  workdir_lock.release(str(tmp_path), workdir_lock.acquire(str(tmp_path)))


def test_a_symlinked_lock_is_never_followed_or_removed(tmp_path):
  target = tmp_path / "precious.txt"
  target.write_text("keep")
  run = tmp_path / "run"
  run.mkdir()
  os.symlink(target, run / workdir_lock.LOCK)
  with pytest.raises(errors.WorkdirBusyError):
    workdir_lock.acquire(str(run))
  assert target.read_text() == "keep" and os.path.islink(run / workdir_lock.LOCK)


def test_release_leaves_another_runs_lock(tmp_path):
  _plant(tmp_path, workdir_lock.holder(os.getppid()))
  workdir_lock.release(str(tmp_path), workdir_lock.holder())
  assert workdir_lock.read(str(tmp_path))["pid"] == os.getppid()


def test_held_is_reentrant_and_released_on_error(tmp_path):
  with pytest.raises(RuntimeError):
    with workdir_lock.held(str(tmp_path)):
      with workdir_lock.held(str(tmp_path)):  # run_experiment -> train -> fit
        assert workdir_lock.read(str(tmp_path))["pid"] == os.getpid()
      assert workdir_lock.read(str(tmp_path))["pid"] == os.getpid()  # the outer one still holds
      raise RuntimeError("the run failed")
  assert workdir_lock.read(str(tmp_path)) is None


def test_sigterm_while_held_exits_preempted_and_releases_the_lock(tmp_path):
  # What a scheduler's SIGTERM does while a run loads its model or evaluates (outside the
  # training loop, whose own handler saves a checkpoint): Python's default would kill the process
  # with the lock left behind.
  code = ("import signal, sys, time; from doran_jax import workdir_lock\n"
          "before = signal.getsignal(signal.SIGTERM)\n"
          f"with workdir_lock.held({str(tmp_path)!r}):\n"
          "  assert signal.getsignal(signal.SIGTERM) is not before\n"
          "  print('held', flush=True); time.sleep(60)\n")
  proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  assert proc.stdout.readline().strip() == "held", proc.stderr.read()
  assert workdir_lock.read(str(tmp_path))["pid"] == proc.pid
  proc.send_signal(15)
  assert proc.wait(timeout=30) == errors.PREEMPTED_EXIT_CODE
  assert "SIGTERM received outside the training loop" in proc.stderr.read()
  assert workdir_lock.read(str(tmp_path)) is None


def test_held_restores_the_callers_sigterm_handler(tmp_path):
  import signal
  mine = lambda signum, frame: None  # noqa: E731
  previous = signal.signal(signal.SIGTERM, mine)
  try:
    with workdir_lock.held(str(tmp_path)):
      assert signal.getsignal(signal.SIGTERM) is not mine
    assert signal.getsignal(signal.SIGTERM) is mine
  finally:
    signal.signal(signal.SIGTERM, previous)


# ------------------------------------------------------------------------------- in a run


def test_training_in_a_locked_workdir_is_refused_and_changes_nothing(shared_data, tmp_path):
  workdir = tmp_path / "run"
  _plant(workdir, workdir_lock.holder(os.getppid()))
  before = _snapshot(workdir)
  with pytest.raises(errors.WorkdirBusyError, match="in use by another run"):
    experiment.train(_config(shared_data, workdir))
  assert _snapshot(workdir) == before  # no run.json, no checkpoint, no metrics


def test_a_run_leaves_no_lock_behind(shared_data, tmp_path):
  workdir = tmp_path / "run"
  assert experiment.train(_config(shared_data, workdir, num_steps=1))["status"] == "done"
  assert not (workdir / workdir_lock.LOCK).exists()


def test_a_killed_runs_lock_does_not_block_the_next_run(shared_data, tmp_path):
  workdir = tmp_path / "run"
  # A process that took the lock and was SIGKILLed holding it.
  code = (f"import os, sys; sys.path.insert(0, {str(REPO)!r});"
          "from doran_jax import workdir_lock;"
          f"workdir_lock.acquire({str(workdir)!r}); os.kill(os.getpid(), 9)")
  proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True)
  assert proc.wait() == -9, proc.stderr.read()
  assert workdir_lock.read(str(workdir))["pid"] == proc.pid
  assert experiment.train(_config(shared_data, workdir, num_steps=1))["status"] == "done"
  assert not (workdir / workdir_lock.LOCK).exists()
  shutil.rmtree(workdir)
