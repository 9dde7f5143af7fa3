"""Files from outside, handled safely: names kept inside their folder, writes that never follow a
symlink or leave a half-written file, and output folders that never clobber someone else's files.

Model folders, adapters and workdirs come from strangers and shared clusters, so every loader
resolves the names it opens with `inside` (a '../x' or absolute entry, or a symlink pointing out
of the folder, is a CheckpointError naming the entry), every JSON/text result goes through
`write_json` / `write_text` (temp file in the same folder, then `os.replace`; a symlink at the
target is refused) and every folder writer checks its target with `check_output_folder`. A writer
that takes a folder (transformers' tokenizer) writes into `staging` and never sees the target's
own names. Our exports carry `checksums.json` (`write_checksums` / `read_checksums` /
`check_sha256`), and numbers read from outside pass `check_finite` and `check_positive`.

A folder may also be a URL (gs://bucket/..., read and written through `doran_jax.paths`). Object
stores have no symlinks, so there the rule is lexical: a name read from the folder may not be
absolute, hold '..', '.' or an empty part; an upload replaces an object whole (no temp file
needed), and a writer that takes a folder writes into a local staging folder that is uploaded
file by file. Local paths keep the symlink and O_NOFOLLOW protections above unchanged.

Example:
  >>> shard = inside("ckpt/", "model-00001-of-00002.safetensors", what="model.safetensors.index.json entry")
  >>> write_json("runs/x/results.json", {"accuracy": 0.9})
  >>> check_output_folder("out/merged", overwrite=False, source="ckpt/")
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import tempfile
from typing import Any, Iterator, Mapping, Optional, Sequence

import numpy as np

from doran_jax import paths
from doran_jax.errors import CheckpointError, UserError


def inside(folder, name, *, what: str = "file") -> str:
  """`folder`/`name` resolved after symlinks, or a CheckpointError if it lies outside `folder`.

  The returned path is the real one, so a symlink swapped in after the check cannot redirect the
  open that follows. A Hugging Face hub cache snapshot's files may point into that repo's blobs/.
  For a URL folder (no symlinks in an object store) the check is lexical (`_inside_url`).

  Example:
    >>> inside("ckpt/", "model.safetensors")
    '/abs/ckpt/model.safetensors'
    >>> inside("ckpt/", "../../etc/passwd", what="index entry")
    Traceback (most recent call last):
    CheckpointError: index entry '../../etc/passwd' in 'ckpt/' lies outside that folder ...
  """
  folder = os.fspath(folder)
  name = os.fspath(name) if isinstance(name, os.PathLike) else name
  if not isinstance(name, str) or not name or os.path.isabs(name):
    raise CheckpointError(f"{what} {name!r} in {folder!r} is not a name inside that folder (an "
                          "absolute path or empty); a model or adapter folder may only name its "
                          "own files. Fix or re-download the folder.")
  if paths.is_remote(folder):
    return _inside_url(folder, name, what)
  lexical = os.path.normpath(name)
  real = os.path.realpath(os.path.join(folder, name))
  roots = _allowed_roots(folder)
  if (lexical == os.curdir or lexical.split(os.sep)[0] == os.pardir
      or not any(os.path.commonpath([r, real]) == r and real != r for r in roots)):
    raise CheckpointError(f"{what} {name!r} in {folder!r} lies outside that folder (it resolves to "
                          f"{real!r}); a model or adapter folder may only name its own files, not "
                          "'..' paths or symlinks pointing out. Fix or re-download the folder.")
  return real


def _inside_url(folder: str, name: str, what: str) -> str:
  """`folder`/`name` for a URL folder, when `name` is a plain relative name: no '..', '.' or
  empty part (object stores take such keys literally, and there is no symlink to resolve)."""
  parts = name.split("/")
  if ".." in parts:
    raise CheckpointError(f"{what} {name!r} in {folder!r} lies outside that folder (a '..' "
                          "path); a model or adapter folder may only name its own files. Fix or "
                          "re-upload the folder.")
  if any(part in ("", ".") for part in parts) or "\\" in name:
    raise CheckpointError(f"{what} {name!r} in {folder!r} is not a plain name inside that folder "
                          "(an empty or '.' part, a backslash, or a URL); a model or adapter "
                          "folder may only name its own files. Fix or re-upload the folder.")
  return paths.join(folder, name)


def _allowed_roots(folder: str) -> list[str]:
  """Where a folder's files may really live: the folder itself and, for a Hugging Face hub cache
  snapshot (<cache>/models--org--name/snapshots/<revision>/), that repo's blobs/, which the
  snapshot's files are symlinks into."""
  root = os.path.realpath(folder)
  roots = [root]
  parent = os.path.dirname(root)
  repo = os.path.dirname(parent)
  if os.path.basename(parent) == "snapshots" and os.path.basename(repo).startswith(
      ("models--", "datasets--")):
    roots.append(os.path.join(repo, "blobs"))
  return roots


def _refuse_symlink(path: str) -> None:
  if paths.is_remote(path):
    return  # object stores have no symlinks
  if os.path.islink(path):
    raise UserError(f"{path!r} is a symlink (to {os.readlink(path)!r}); refusing to write through "
                    "it, which would overwrite whatever it points to. Remove the link or write "
                    "elsewhere.")


@contextlib.contextmanager
def replacing(path) -> Iterator[str]:
  """Yields a fresh temp path in `path`'s folder; on success it replaces `path` (`os.replace`).

  For writers that take a file name (safetensors' save_file). A symlink at `path` is refused
  (never written through); on an error the temp file is removed and `path` is left as it was.
  For a URL the temp file is local and is uploaded on success (one upload: the object appears
  whole or not at all).

  Example:
    >>> with replacing("out/model.safetensors") as tmp:
    ...   save_file(tensors, tmp)
  """
  path = os.fspath(path)
  if paths.is_remote(path):
    fd, tmp = tempfile.mkstemp(prefix=".doran-upload-", suffix=".tmp")
    os.close(fd)
    try:
      yield tmp
      paths.upload(tmp, path)
    finally:
      os.remove(tmp)
    return
  _refuse_symlink(path)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".",
                             prefix="." + os.path.basename(path) + ".", suffix=".tmp")
  os.close(fd)
  try:
    yield tmp
    os.replace(tmp, path)  # replaces a link racing in after the check, never follows it
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_bytes(path, data: bytes) -> str:
  """Writes `data` to `path` atomically (`replacing`): never through a symlink, never half a file.

  Example:
    >>> write_bytes("export/adapters.msgpack", blob)
  """
  path = os.fspath(path)
  if paths.is_remote(path):
    paths.write_bytes(path, data)  # an object is replaced whole or not at all
    return path
  with replacing(path) as tmp:
    with open(tmp, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
  return path


def append_text(path, text: str) -> str:
  """Appends UTF-8 `text` to `path` (created if absent), never through a symlink (O_NOFOLLOW).

  An object store has no append: a URL's object is read and uploaded again with `text` added
  (so callers batch their appends there; `progress.MetricWriter` does).

  Example:
    >>> append_text("runs/x/metrics.jsonl", json.dumps(record) + "\n")
  """
  path = os.fspath(path)
  if paths.is_remote(path):
    old = paths.read_bytes(path) if paths.exists(path) else b""
    paths.write_bytes(path, old + text.encode("utf-8"))
    return path
  _refuse_symlink(path)
  try:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
  except OSError as e:
    _refuse_symlink(path)  # a link that appeared after the check: the same clear refusal
    raise UserError(f"cannot append to {path!r}: {e}.") from None
  with os.fdopen(fd, "a", encoding="utf-8") as f:
    f.write(text)
  return path


def write_text(path, text: str) -> str:
  """`write_bytes` of UTF-8 text.

  Example:
    >>> write_text("runs/x/metrics.jsonl", "".join(lines))
  """
  return write_bytes(path, text.encode("utf-8"))


def write_json(path, obj: Any, **dump_kwargs) -> str:
  """`obj` as JSON (json.dump's kwargs; indent=2 by default), written with `write_bytes`.

  Example:
    >>> write_json("runs/x/results.json", {"accuracy": 0.9})
  """
  dump_kwargs.setdefault("indent", 2)
  return write_text(path, json.dumps(obj, **dump_kwargs))


def _same(a: str, b: str) -> bool:
  try:
    return os.path.samefile(a, b)
  except OSError:
    return os.path.realpath(a) == os.path.realpath(b)


def check_output_folder(path, *, overwrite: bool = False, sources: Sequence[Optional[str]] = (),
                        what: str = "output folder") -> str:
  """Checks that a folder writer may write into `path`, and returns it as a str.

  Refused always: a symlink, and any of `sources` (the folder a backbone was loaded from, or the
  folder holding its GGUF file), however it is spelt. Refused unless `overwrite`: an existing
  folder that is not empty. A file at `path` is refused too. A URL gets the same checks (no
  symlinks there; its sources compared as URLs).

  Example:
    >>> check_output_folder("out/merged", sources=[bb.source])
    'out/merged'
  """
  path = os.fspath(path)
  if paths.is_remote(path):
    return _check_output_url(path, overwrite=overwrite, sources=sources, what=what)
  _refuse_symlink(path.rstrip(os.sep) or path)
  if os.path.exists(path) and not os.path.isdir(path):
    raise UserError(f"{what} {path!r} is a file, not a folder; pass a folder path.")
  real = os.path.realpath(path)
  for source in sources:
    if not source:
      continue
    root = os.path.realpath(os.fspath(source))
    if _same(real, root):
      raise UserError(f"{what} {path!r} is the folder the model was loaded from "
                      f"({os.fspath(source)!r}); writing there would overwrite the original "
                      "weights. Write to another folder.")
  if os.path.isdir(path) and os.listdir(path) and not overwrite:
    raise _not_empty(what, path, sorted(os.listdir(path)))
  return path


def _not_empty(what: str, path: str, listing: list[str]) -> UserError:
  shown = ", ".join(listing[:8]) + (" ..." if len(listing) > 8 else "")
  return UserError(f"{what} {path!r} is not empty (it holds {shown}); refusing to overwrite it. "
                   "Write to a new or empty folder, or pass overwrite=True to replace its files.")


def _check_output_url(path: str, *, overwrite: bool, sources, what: str) -> str:
  if paths.isfile(path):
    raise UserError(f"{what} {path!r} is a file, not a folder; pass a folder path.")
  for source in sources:
    if source and paths.is_remote(source) and paths.normal(source) == paths.normal(path):
      raise UserError(f"{what} {path!r} is the folder the model was loaded from ({source!r}); "
                      "writing there would overwrite the original weights. Write to another "
                      "folder.")
  if not overwrite and paths.isdir(path):
    listing = paths.listdir(path)
    if listing:
      raise _not_empty(what, path, listing)
  return path


@contextlib.contextmanager
def staging(folder) -> Iterator[str]:
  """Yields a fresh empty folder inside `folder`; on success its files are moved into `folder`.

  For third-party writers that take a folder (transformers' `save_pretrained`) and would open
  a symlink planted at one of their names. Every target is checked before anything moves: a
  symlink is refused (`folder` is left as it was), and each file then replaces its target
  (`os.replace`, which never follows a link). The staging folder is removed either way.

  For a URL `folder` the staging folder is local and each of its files is uploaded on success.

  Example:
    >>> with staging("out/merged") as tmp:
    ...   tokenizer.save_pretrained(tmp)
  """
  folder = os.fspath(folder)
  if paths.is_remote(folder):
    tmp = tempfile.mkdtemp(prefix=".doran-staging-")
    try:
      yield tmp
      for root, _, names in os.walk(tmp):
        rel = os.path.relpath(root, tmp)
        for name in names:
          target = paths.join(folder, *([] if rel == os.curdir else rel.split(os.sep)), name)
          paths.upload(os.path.join(root, name), target)
    finally:
      shutil.rmtree(tmp, ignore_errors=True)
    return
  tmp = tempfile.mkdtemp(dir=folder, prefix=".staging-")
  try:
    yield tmp
    moves = []
    for root, dirs, names in os.walk(tmp):
      rel = os.path.relpath(root, tmp)
      for name in dirs + names:
        target = os.path.normpath(os.path.join(folder, rel, name))
        _refuse_symlink(target)
        if name in names:
          moves.append((os.path.join(root, name), target))
    for source, target in moves:
      os.makedirs(os.path.dirname(target), exist_ok=True)
      os.replace(source, target)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------ checksums of our exports

CHECKSUMS = "checksums.json"
CHECKSUMS_VERSION = 1


def file_sha256(path) -> str:
  """SHA-256 (hex) of a file, read in 1 MiB blocks."""
  digest = hashlib.sha256()
  with paths.open_read(path) as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def write_checksums(folder, names: Sequence[str]) -> str:
  """Writes `folder`/checksums.json: the SHA-256 of each of `names`, files already written.

  The export's counterpart of a checkpoint's integrity record (checkpoint.py): written last, so
  an export interrupted before it has none, and checked by the loaders with `check_sha256`.

  Example:
    >>> write_checksums("runs/x/export/adapters", ["adapters.msgpack", "adapter_config.json"])
  """
  folder = os.fspath(folder)
  sums = {name: file_sha256(inside(folder, name)) for name in names}
  return write_json(paths.join(folder, CHECKSUMS),
                    {"version": CHECKSUMS_VERSION, "sha256": sums}, sort_keys=True)


def read_checksums(folder, *, fix: str) -> Optional[dict[str, str]]:
  """{file name: SHA-256} of `folder`/checksums.json, or None when the folder has none.

  A checksums.json that is not a version-1 record is a CheckpointError ending with `fix`.
  """
  folder = os.fspath(folder)
  if not paths.lexists(paths.join(folder, CHECKSUMS)):
    return None
  try:
    record = json.loads(paths.read_bytes(inside(folder, CHECKSUMS)).decode("utf-8"))
    sums = record["sha256"] if record.get("version") == CHECKSUMS_VERSION else None
  except (ValueError, UnicodeDecodeError, KeyError, AttributeError, TypeError):
    sums = None
  if not isinstance(sums, dict) or not all(isinstance(v, str) for v in sums.values()):
    raise CheckpointError(f"{CHECKSUMS} in {folder!r} is damaged (not a version "
                          f"{CHECKSUMS_VERSION} checksum record), so the files beside it cannot "
                          f"be verified. {fix}")
  return sums


def check_sha256(folder, name: str, checksums: Mapping[str, str], *, data: Optional[bytes] = None,
                 fix: str) -> None:
  """Checks `folder`/`name` (or `data`, the bytes already read from it) against `checksums`.

  Raises:
    CheckpointError: naming the file, when its checksum differs or `checksums` lacks it;
      the message ends with `fix`.

  Example:
    >>> sums = read_checksums(folder, fix="Re-export it.")
    >>> check_sha256(folder, "adapters.msgpack", sums, data=blob, fix="Re-export it.")
  """
  folder = os.fspath(folder)
  if name not in checksums:
    raise CheckpointError(f"{CHECKSUMS} in {folder!r} has no checksum for {name!r}, so that file "
                          f"cannot be verified. {fix}")
  actual = (hashlib.sha256(data).hexdigest() if data is not None
            else file_sha256(inside(folder, name)))
  if actual != checksums[name]:
    raise CheckpointError(f"{name!r} in {folder!r} is damaged: its SHA-256 does not match the one "
                          f"recorded in {CHECKSUMS} when it was written. {fix}")


# ------------------------------------------------------------------ numbers read from outside


def check_finite(tensors: Mapping[str, Any], *, source: str, fix: str) -> None:
  """A CheckpointError naming the tensors of `tensors` ({name: array}) holding NaN or inf.

  Example:
    >>> check_finite({"a/lora_b": b}, source="export 'runs/x'", fix="Retrain it.")
  """
  bad = []
  for name, x in tensors.items():
    x = np.asarray(x)
    if x.dtype.kind not in "fc":
      if not x.dtype.name.startswith(("bfloat", "float")):
        continue  # integer and bool leaves are always finite
      x = x.astype(np.float32)  # ml_dtypes' bfloat16 / float8
    n = int(x.size - np.count_nonzero(np.isfinite(x)))
    if n:
      bad.append(f"{name} ({n} of {x.size} values)")
  if bad:
    raise CheckpointError(f"{source} holds non-finite values (NaN or inf) in {len(bad)} "
                          f"tensor(s): {', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''}. {fix}")


def check_positive(record: Mapping[str, Any], keys: Sequence[str], *, source: str, fix: str,
                   integer: Sequence[str] = ()) -> None:
  """Each of `keys` present in `record` is a finite number > 0 (an int for those in `integer`),
  else a CheckpointError naming the key and its value.

  Example:
    >>> check_positive({"r": 8, "lora_alpha": float("nan")}, ["r", "lora_alpha"], integer=["r"],
    ...                source="adapter_config.json in 'peft/'", fix="Fix or re-save it.")
    Traceback (most recent call last):
    CheckpointError: adapter_config.json in 'peft/': lora_alpha is nan; ...
  """
  for key in keys:
    if key not in record:
      continue
    value = record[key]
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if key in integer:
      number = number and float(value).is_integer()
    if not number or not math.isfinite(value) or value <= 0:
      kind = "a positive integer" if key in integer else "a finite number > 0"
      raise CheckpointError(f"{source}: {key} is {value!r}; it must be {kind}. {fix}")
