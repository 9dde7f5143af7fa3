"""Errors a person can read: our own config, data, run-identity, checkpoint and NaN errors.

Every error the library raises about something the user can fix derives from `UserError`; the
entry points (train.py, eval.py) print its message alone, without a traceback, and exit with
status 2 (`--verbose` or DORAN_VERBOSE=1 shows the traceback). `UserError` is a `ValueError`,
so code that catches ValueError keeps working. A missing or unreadable file (FileNotFoundError,
PermissionError, ... on a path the user gave: data.path, model.name, the workdir) is reported the
same way, as one 'file error' line.

Exit statuses of the entry points: 0 finished, 1 a bug (Python's traceback), `EXIT_CODE` (2) an
error the user can fix, `PREEMPTED_EXIT_CODE` (143) stopped by SIGTERM (or one Ctrl-C) after
saving a checkpoint (train.py; run the same command again to resume).

Example:
  >>> raise ConfigError("optim.lr must be a finite number > 0, got nan; set --config.optim.lr=1e-3.")

  # in an entry point:
  >>> def main(argv):
  ...   with errors.reported(verbose=_VERBOSE.value):
  ...     experiment.run_experiment(config)
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import traceback

EXIT_CODE = 2  # distinct from Python's 1 for an unexpected exception
# 128 + SIGTERM, what a shell reports for a process that SIGTERM ended: a scheduler that already
# requeues on it keeps doing so, and it is neither 0 (finished) nor 1 or 2 (failed).
PREEMPTED_EXIT_CODE = 128 + signal.SIGTERM

# Operating-system errors about a path: the user's file or folder, not a bug in this package.
FILE_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError,
               FileExistsError)


class UserError(ValueError):
  """Something the user can fix: the message names the bad value and the fix.

  Its subclasses say what kind (`kind`, the word before 'error:' in `format_error`).

  Example:
    >>> import doran_jax
    >>> try:
    ...   doran_jax.AdapterConfig(rank=0)
    ... except UserError as e:
    ...   print(format_error(e))
    config error: rank must be a positive integer, got 0.
  """

  kind = "error"


class ConfigError(UserError):
  """An invalid config value or combination (caught before any data or model is read)."""

  kind = "config"


class DataError(UserError):
  """A data file that cannot be read as configured (encoding, columns, labels)."""

  kind = "data"


class RunMismatchError(UserError):
  """A workdir holds a different run than the config describes (see doran_jax.fingerprint)."""

  kind = "run"


class WorkdirBusyError(UserError):
  """Another live run holds the workdir's lock (see doran_jax.workdir_lock)."""

  kind = "run"


class CheckpointError(UserError):
  """A checkpoint that is missing, damaged or does not match this run."""

  kind = "checkpoint"


def verbose_from_env() -> bool:
  """DORAN_VERBOSE=1 (or true/yes) asks for tracebacks.

  Example:
    >>> os.environ["DORAN_VERBOSE"] = "yes"
    >>> verbose_from_env()
    True
    >>> del os.environ["DORAN_VERBOSE"]
  """
  return os.environ.get("DORAN_VERBOSE", "").strip().lower() in ("1", "true", "yes")


def format_error(error: Exception) -> str:
  """'<kind> error: <message>' — the one line (or short paragraph) the user sees.

  Example:
    >>> format_error(DataError("train.tsv line 3 has 1 column, expected 2."))
    'data error: train.tsv line 3 has 1 column, expected 2.'
    >>> error = FileNotFoundError(2, "No such file or directory", "data/train.tsv")
    >>> format_error(error).split(";")[0]
    "file error: [Errno 2] No such file or directory: 'data/train.tsv'"
  """
  if isinstance(error, FILE_ERRORS):
    return (f"file error: {error}; check the path and its permissions (data.path, model.name, "
            "workdir).")
  return f"{error.kind} error: {error}"


@contextlib.contextmanager
def reported(verbose: bool = False, stream=None):
  """Turns a UserError (or a FILE_ERRORS one) raised inside into its message on stderr and
  `SystemExit(2)`.

  Other exceptions propagate unchanged (they are bugs: the traceback is the useful part).
  With `verbose` (or DORAN_VERBOSE=1) the traceback is printed above the message.

  Example:
    >>> import io
    >>> stream = io.StringIO()
    >>> with reported(stream=stream):
    ...   raise ConfigError("optim.lr must be a finite number > 0, got 0.0.")
    Traceback (most recent call last):
      ...
    SystemExit: 2
    >>> print(stream.getvalue().splitlines()[-1])
    config error: optim.lr must be a finite number > 0, got 0.0.
  """
  try:
    yield
  except (UserError,) + FILE_ERRORS as error:
    stream = stream or sys.stderr
    if verbose or verbose_from_env():
      traceback.print_exc(file=stream)
    else:
      stream.write("(run with --verbose or DORAN_VERBOSE=1 for the traceback)\n")
    stream.write(format_error(error) + "\n")
    stream.flush()
    raise SystemExit(EXIT_CODE) from None
