"""Where files live: a local path, or a URL (gs://bucket/..., memory://...) read through fsspec.

On a pod the checkpoint folder and the workdir live in a bucket. Every file that doran_jax reads
from a model folder or writes into a workdir goes through this module or through
`doran_jax.files` (the safety rules), which uses it: a local path takes the `os` calls it always
took, and a URL takes fsspec's filesystem for its scheme (`gs://` needs gcsfs, the `gcs` extra:
`bash scripts/setup.sh gcs`). `file://` URLs are refused: pass the plain path, which keeps the
local symlink protections of `files`.

Object stores have no folders, symlinks, appends or renames: `isdir` means 'has objects under
it', `makedirs` is a no-op there, `move` is copy-then-delete, and an upload appears whole or not
at all (what `files` relies on instead of a temp file and `os.replace`).

orbax writes checkpoints itself (tensorstore for the arrays, etils.epath for the rest), to local
paths and gs:// only: `for_orbax` gives it the spelling it can use, or a clear error.

Example:
  >>> paths.is_remote("gs://my-bucket/llama-7b"), paths.is_remote("ckpt/")
  (True, False)
  >>> paths.read_bytes("gs://my-bucket/llama-7b/config.json")[:1]
  b'{'
  >>> paths.listdir("gs://my-bucket/runs/x/checkpoints")
  ['2', '4']
"""

from __future__ import annotations

import os
import posixpath
import re
from typing import IO, Optional

from doran_jax.errors import UserError

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
_GCSFS = "gcsfs (bash scripts/setup.sh gcs, or pip install -e '.[gcs]': gcsfs==2026.10.1)"
_INSTALL = {"gs": _GCSFS, "gcs": _GCSFS}


def scheme(path) -> Optional[str]:
  """The URL scheme of `path` ('gs', 'memory', ...), or None for a local path."""
  match = _SCHEME.match(os.fspath(path)) if isinstance(path, (str, os.PathLike)) else None
  return match.group(1).lower() if match else None


def is_remote(path) -> bool:
  """Whether `path` is a URL (read and written through fsspec) rather than a local path."""
  return scheme(path) is not None


def filesystem(url: str):
  """(fsspec filesystem, the path inside it) for a URL; a UserError naming the package a
  scheme needs when its client is not installed.

  Example:
    >>> fs, path = filesystem("memory://bucket/x.json")
  """
  url = os.fspath(url)
  name = scheme(url)
  if name is None:
    raise ValueError(f"{url!r} is a local path, not a URL.")
  if name == "file":
    raise UserError(f"{url!r}: pass local files as plain paths ({url[len('file://'):]!r}), so "
                    "the local symlink protections apply.")
  import fsspec  # huggingface_hub's dependency; pinned in pyproject
  try:
    return fsspec.core.url_to_fs(url)
  except ImportError as e:
    need = _INSTALL.get(name, f"fsspec's client for {name}://")
    raise UserError(f"{url!r} needs {need}: {e}") from None
  except ValueError as e:  # fsspec: "Protocol not known"
    raise UserError(f"{url!r}: fsspec knows no filesystem for {name}:// ({e}). Use a local "
                    "path, or gs:// with gcsfs installed.") from None


def _fs(url: str):
  fs, path = filesystem(url)
  # Listings are cached by some clients (gcsfs): orbax and other hosts write behind their back.
  fs.invalidate_cache(path)
  return fs, path


def join(folder, *names: str) -> str:
  """`folder`/`name`/...: os.path.join for a local folder, '/'-joined for a URL (a URL is never
  normalised: that would turn 'gs://' into 'gs:/')."""
  folder = os.fspath(folder)
  if not is_remote(folder):
    return os.path.join(folder, *names)
  out = folder
  for name in names:
    out = out.rstrip("/") + "/" + name.lstrip("/")
  return out


def normal(path) -> str:
  """One spelling per location: realpath for a local path, no trailing '/' for a URL."""
  path = os.fspath(path)
  return path.rstrip("/") if is_remote(path) else os.path.realpath(path)


def exists(path) -> bool:
  path = os.fspath(path)
  if not is_remote(path):
    return os.path.exists(path)
  fs, p = _fs(path)
  return fs.exists(p)


def lexists(path) -> bool:
  """`os.path.lexists` locally (a dangling symlink exists); `exists` for a URL (no symlinks)."""
  path = os.fspath(path)
  return os.path.lexists(path) if not is_remote(path) else exists(path)


def isfile(path) -> bool:
  path = os.fspath(path)
  if not is_remote(path):
    return os.path.isfile(path)
  fs, p = _fs(path)
  return fs.isfile(p)


def isdir(path) -> bool:
  """A folder; for a URL, a prefix with objects under it (or a bucket)."""
  path = os.fspath(path)
  if not is_remote(path):
    return os.path.isdir(path)
  fs, p = _fs(path)
  return fs.isdir(p)


def listdir(path) -> list[str]:
  """The names directly in a folder (sorted for a URL); FileNotFoundError if there is none."""
  path = os.fspath(path)
  if not is_remote(path):
    return os.listdir(path)
  fs, p = _fs(path)
  if not fs.isdir(p):
    raise FileNotFoundError(f"no folder {path!r}")
  names = {posixpath.basename(entry.rstrip("/")) for entry in fs.ls(p, detail=False)}
  return sorted(n for n in names if n)


def getsize(path) -> int:
  path = os.fspath(path)
  if not is_remote(path):
    return os.path.getsize(path)
  fs, p = _fs(path)
  return int(fs.size(p))


def open_read(path) -> IO[bytes]:
  """A binary file object to read (a local file, or fsspec's buffered remote file)."""
  path = os.fspath(path)
  if not is_remote(path):
    return open(path, "rb")
  fs, p = _fs(path)
  return fs.open(p, "rb")


def read_bytes(path, start: Optional[int] = None, end: Optional[int] = None) -> bytes:
  """The bytes of a file, or of [start, end) (one ranged read on an object store).

  Example:
    >>> header_size = int.from_bytes(read_bytes(url, 0, 8), "little")
  """
  path = os.fspath(path)
  if not is_remote(path):
    with open(path, "rb") as f:
      if start is None and end is None:
        return f.read()
      f.seek(start or 0)
      return f.read(-1 if end is None else end - (start or 0))
  fs, p = _fs(path)
  return fs.cat_file(p, start=start, end=end)


def makedirs(path) -> None:
  """`os.makedirs(exist_ok=True)`; a no-op on an object store (no folders there)."""
  path = os.fspath(path)
  if not is_remote(path):
    os.makedirs(path, exist_ok=True)
    return
  fs, p = _fs(path)
  if scheme(path) in ("gs", "gcs", "s3", "az"):
    return  # gcsfs would try to create a bucket; a prefix needs nothing
  fs.makedirs(p, exist_ok=True)


def remove(path) -> None:
  path = os.fspath(path)
  if not is_remote(path):
    os.remove(path)
    return
  fs, p = _fs(path)
  fs.rm_file(p)


def move(source, target) -> None:
  """`os.rename` locally; for URLs copy-then-delete (recursive), which object stores need."""
  source, target = os.fspath(source), os.fspath(target)
  if not is_remote(source) and not is_remote(target):
    os.rename(source, target)
    return
  if not (is_remote(source) and is_remote(target)):
    raise ValueError(f"cannot move between a local path and a URL ({source!r} -> {target!r}).")
  fs, p = _fs(source)
  fs.mv(p, filesystem(target)[1], recursive=True)


# ------------------------------------------------ writes to URLs (files.py applies the rules)


def write_bytes(url: str, data: bytes, *, create: bool = False) -> None:
  """Uploads `data` as the object at `url` (whole or not at all on an object store).

  `create=True` writes only if nothing is there (FileExistsError otherwise): atomic on GCS with
  gcsfs (its 'create' mode, an ifGenerationMatch=0 precondition, which gcsfs calls
  experimental) and in memory://; other fsspec filesystems check, then write.
  """
  fs, p = _fs(url)
  fs.pipe_file(p, data, mode="create" if create else "overwrite")


def upload(local: str, url: str) -> None:
  """Copies the local file `local` to `url` (one upload; a 7B shard never sits in memory)."""
  fs, p = _fs(url)
  fs.put_file(local, p)


def download(url: str, local: str) -> None:
  """Copies `url` to the local file `local`."""
  fs, p = _fs(url)
  fs.get_file(p, local)


def local_folder(url: str) -> Optional[str]:
  """The local folder a URL names when its fsspec filesystem is a folder on this machine's disk
  (fsspec's DirFileSystem over the local filesystem, e.g. a test's stand-in for a bucket), else
  None."""
  from fsspec.implementations.dirfs import DirFileSystem
  from fsspec.implementations.local import LocalFileSystem
  fs, p = filesystem(url)
  if isinstance(fs, DirFileSystem) and isinstance(fs.fs, LocalFileSystem):
    return fs._join(p)  # noqa: SLF001 (fsspec has no public name for the mapped path)
  return None


def for_orbax(path) -> str:
  """The spelling of a checkpoint folder that orbax 0.12.8 can write: an absolute local path,
  or a gs:// URL (tensorstore's GCS driver for the arrays, etils.epath over gcsfs for the rest).

  A URL whose filesystem maps onto a local folder (`local_folder`) gives that folder. Any other
  scheme (memory://, s3://, ...) is a UserError: orbax's tensorstore writer takes only local
  paths and gs://.

  Example:
    >>> for_orbax("runs/x/checkpoints")
    '/home/me/doran_jax/runs/x/checkpoints'
    >>> for_orbax("gs://my-bucket/runs/x/checkpoints")
    'gs://my-bucket/runs/x/checkpoints'
  """
  path = os.fspath(path)
  if not is_remote(path):
    return os.path.abspath(path)
  local = local_folder(path)
  if local is not None:
    return local
  if scheme(path) == "gs":
    return path.rstrip("/")
  raise UserError(f"checkpoints cannot be written to {path!r}: orbax (0.12.8) writes checkpoint "
                  "arrays with tensorstore, which takes local paths and gs:// only. Put the "
                  "workdir on local disk or in a gs:// bucket.")
