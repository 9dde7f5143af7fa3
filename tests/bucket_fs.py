"""A stand-in for a Google Cloud Storage bucket in tests: fsspec's DirFileSystem over a local
folder, registered under fsspec's 'gs' and 'gcs' protocols (gcsfs is not installed here, and the
tests are offline).

doran_jax reaches it only as gs://... URLs through doran_jax.paths (fsspec), exactly as it
reaches gcsfs on a pod. orbax is the exception: its arrays go through tensorstore, which would
call the real GCS for a gs:// path, so `paths.for_orbax` hands orbax the local folder the URL
maps onto (the one thing here that differs from a pod, where orbax gets the gs:// URL).

Example:
  >>> root = bucket_fs.register(tmp_path / "bucket")
  >>> ...                                   # gs://my-bucket/x is now root/my-bucket/x
  >>> bucket_fs.unregister()
"""

import importlib
import os

import fsspec
from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem

PROTOCOLS = ("gs", "gcs")
_registry = importlib.import_module("fsspec.registry")._registry
_saved = {}


def register(root) -> str:
  """Serves gs://<bucket>/<key> from <root>/<bucket>/<key>; returns root."""
  root = os.fspath(root)
  os.makedirs(root, exist_ok=True)

  class LocalBucket(DirFileSystem):
    protocol = PROTOCOLS

    def __init__(self, *args, **kwargs):
      super().__init__(path=root, fs=LocalFileSystem(auto_mkdir=True))  # no folders in a bucket

  for name in PROTOCOLS:
    if name not in _saved:
      _saved[name] = _registry.get(name)
    fsspec.register_implementation(name, LocalBucket, clobber=True)
  return root


def unregister() -> None:
  """Puts fsspec's registry back as it was before `register`."""
  for name, cls in _saved.items():
    if cls is None:
      _registry.pop(name, None)
    else:
      _registry[name] = cls
  _saved.clear()
