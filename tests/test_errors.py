"""doran_jax.errors: UserError is a ValueError; `reported` prints one message and exits 2."""

import io

import pytest

from doran_jax import errors


def test_user_errors_are_value_errors_with_a_kind():
  for cls, kind in [(errors.ConfigError, "config"), (errors.DataError, "data"),
                    (errors.RunMismatchError, "run"), (errors.CheckpointError, "checkpoint")]:
    assert issubclass(cls, errors.UserError) and issubclass(cls, ValueError)
    assert cls.kind == kind


def test_reported_prints_the_message_without_traceback(monkeypatch):
  monkeypatch.delenv("DORAN_VERBOSE", raising=False)
  out = io.StringIO()
  with pytest.raises(SystemExit) as exit_info:
    with errors.reported(stream=out):
      raise errors.ConfigError("optim.lr must be > 0, got -1.0")
  assert exit_info.value.code == errors.EXIT_CODE
  text = out.getvalue()
  assert text.splitlines()[-1] == "config error: optim.lr must be > 0, got -1.0"
  assert "Traceback" not in text


@pytest.mark.parametrize("how", ["flag", "env"])
def test_reported_shows_the_traceback_when_verbose(monkeypatch, how):
  monkeypatch.setenv("DORAN_VERBOSE", "1" if how == "env" else "0")
  out = io.StringIO()
  with pytest.raises(SystemExit):
    with errors.reported(verbose=how == "flag", stream=out):
      raise errors.DataError("bad file")
  assert "Traceback" in out.getvalue() and "data error: bad file" in out.getvalue()


def test_reported_lets_other_exceptions_through():
  with pytest.raises(ZeroDivisionError):
    with errors.reported(stream=io.StringIO()):
      1 / 0  # pylint: disable=pointless-statement


@pytest.mark.parametrize("error", [
    FileNotFoundError(2, "No such file or directory", "/data/train.tsv"),
    PermissionError(13, "Permission denied", "/data/train.tsv")])
def test_reported_turns_a_file_error_into_one_line(monkeypatch, error):
  # A user's missing or unreadable file is not a bug: one line naming the path, exit 2.
  monkeypatch.delenv("DORAN_VERBOSE", raising=False)
  out = io.StringIO()
  with pytest.raises(SystemExit) as exit_info:
    with errors.reported(stream=out):
      raise error
  assert exit_info.value.code == errors.EXIT_CODE
  last = out.getvalue().splitlines()[-1]
  assert last.startswith(f"file error: [Errno {error.errno}] {error.strerror}: '/data/train.tsv'")
  assert "Traceback" not in out.getvalue()


def test_reported_lets_other_os_errors_through():
  with pytest.raises(ConnectionResetError):
    with errors.reported(stream=io.StringIO()):
      raise ConnectionResetError("peer went away")


def test_preempted_exit_code_is_distinct():
  assert errors.PREEMPTED_EXIT_CODE == 143   # 128 + SIGTERM, documented in train.py
  assert len({0, 1, errors.EXIT_CODE, errors.PREEMPTED_EXIT_CODE}) == 4
