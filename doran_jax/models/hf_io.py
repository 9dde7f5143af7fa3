"""Hugging Face checkpoint folders (config.json + safetensors) to Flax params and back, without torch.

The naming rule. Our param path is the PyTorch state-dict name with '.' -> '/', except for the
leaf's own key:

  torch                      ours                     layout
  Linear      .weight (O, I) .../kernel (I, O)        transposed
  Conv1D      .weight (I, O) .../kernel (I, O)        as is (GPT-2; the family's `no_transpose`)
  Conv{1,2}d  .weight (O, I, *K) .../kernel (*K, I, O)  axes moved (flax's conv layout)
  Embedding   .weight        .../embedding            as is
  LayerNorm / RMSNorm .weight .../scale               as is
  any         .bias          .../bias                 as is
  a parameter such as ViT's `cls_token` keeps its name and layout.

Which torch `weight` an our-path leaf came from is decided by our leaf name, so the abstract param
tree of the Flax module (from `jax.eval_shape` of its init) drives loading: every leaf is looked
up in the checkpoint, and what the checkpoint lacks is reported, not invented.

A folder may be a URL (gs://bucket/llama-7b, through `doran_jax.paths`): its safetensors headers
are read and checked first, then each tensor is fetched by one ranged read as it is placed, so
the host never holds a whole shard.

Example:
  >>> state = read_state("ckpt/", dtype=ml_dtypes.bfloat16)          # host numpy, cast on read
  >>> abstract = jax.eval_shape(module.init, key, batch)["params"]
  >>> params, missing, unused = to_flax(state, abstract, prefix="bert")
  >>> save_pretrained(params, read_config("ckpt/"), "out/")
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import numpy as np
from flax import traverse_util

from doran_jax import paths
from doran_jax.errors import CheckpointError
from doran_jax.files import check_output_folder, inside, replacing, write_json

SEP = "/"
CONFIG = "config.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
# Our leaf key -> torch's, for leaves that torch names `weight`.
_WEIGHT_LEAVES = ("kernel", "embedding", "scale")


# ------------------------------------------------------------------------------------ reading

def _listing(path: str) -> str:
  try:
    names = sorted(paths.listdir(path))
  except (OSError, ValueError):
    return "(the folder does not exist)"
  return ", ".join(names[:20]) + (" ..." if len(names) > 20 else "") if names else "(empty)"


def read_config(path: str) -> dict:
  """The folder's config.json as a dict.

  Example:
    >>> read_config("ckpt/")["model_type"]
    'bert'
  """
  path = os.fspath(path)
  file = inside(path, CONFIG)
  if not paths.isfile(file):
    raise FileNotFoundError(f"no {CONFIG} in {path!r}; it holds: {_listing(path)}.")
  return json.loads(paths.read_bytes(file))


def weight_files(path: str) -> list[str]:
  """The safetensors files of a checkpoint folder: the single file, or the index's shards in order.

  Every file resolves inside `path` after symlinks (`files.inside`): an index entry such as
  '../../x.safetensors', an absolute path or a symlink out of the folder is a CheckpointError.
  """
  path = os.fspath(path)
  index = inside(path, INDEX)
  if paths.lexists(paths.join(path, INDEX)):
    try:
      weight_map = json.loads(paths.read_bytes(index))["weight_map"]
    except (ValueError, KeyError, TypeError) as e:
      raise CheckpointError(f"{INDEX} in {path!r} is not a safetensors index (a JSON object "
                            f"with a 'weight_map'): {e}. Fix or re-download the folder.") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
      raise CheckpointError(f"{INDEX} in {path!r}: 'weight_map' must map tensor names to shard "
                            "file names. Fix or re-download the folder.")
    # dict.fromkeys keeps the index's first-seen order and drops repeats.
    files = [inside(path, name, what=f"{INDEX} entry")
             for name in dict.fromkeys(weight_map.values())]
    absent = [f for f in files if not paths.isfile(f)]
    if absent:
      raise FileNotFoundError(f"{INDEX} in {path!r} names shards that are not there: "
                              f"{[os.path.basename(f) for f in absent]}; it holds: {_listing(path)}.")
    return files
  if paths.lexists(paths.join(path, WEIGHTS)):
    single = inside(path, WEIGHTS)
    if paths.isfile(single):
      return [single]
  hint = ""
  if paths.isdir(path) and any(n.endswith(".bin") or n.endswith(".pt")
                               for n in paths.listdir(path)):
    hint = (" PyTorch pickles (.bin) are not read without torch: convert them once with "
            "transformers (`model.save_pretrained(path, safe_serialization=True)`).")
  raise FileNotFoundError(f"no {WEIGHTS} or {INDEX} in {path!r}; it holds: {_listing(path)}.{hint}")


def iter_state(path: str, *, dtype=None) -> Iterator[tuple[str, np.ndarray]]:
  """Yields (torch name, host array) one tensor at a time, shard after shard.

  Each tensor is cast to `dtype` (a numpy or ml_dtypes dtype) as it is read, so a bf16 load never
  holds more than one float32 tensor. For callers that place tensors on devices as they come.

  Example:
    >>> for name, x in iter_state("ckpt/", dtype=ml_dtypes.bfloat16):
    ...   print(name, x.shape, x.dtype)
  """
  from safetensors import safe_open
  dtype = as_numpy_dtype(dtype)
  for file in weight_files(path):
    if paths.is_remote(file):
      for name, reader in lazy_file(file, dtype=dtype).items():
        yield name, reader()
      continue
    with safe_open(file, framework="np") as f:
      for name in f.keys():
        x = f.get_tensor(name)
        # Integer buffers (position ids) keep their type; only floating tensors are cast.
        if dtype is not None and _is_float(x.dtype) and x.dtype != dtype:
          x = x.astype(dtype)
        yield name, x


def as_numpy_dtype(dtype):
  """None, a name ('bfloat16', 'float32'), a numpy/ml_dtypes type or jnp.bfloat16 -> np.dtype."""
  if dtype is None:
    return None
  if isinstance(dtype, str):
    import ml_dtypes
    return np.dtype(getattr(ml_dtypes, dtype)) if hasattr(ml_dtypes, dtype) else np.dtype(dtype)
  return np.dtype(dtype)


def _is_float(dtype) -> bool:
  # ml_dtypes' bfloat16 and float8 types are not np.floating subtypes.
  return np.issubdtype(dtype, np.floating) or np.dtype(dtype).name.startswith(("bfloat", "float"))


def cast(x, dtype):
  """A floating host array cast to `dtype` (None: as is); integer buffers keep their type."""
  dtype = as_numpy_dtype(dtype)
  if dtype is not None and _is_float(x.dtype) and x.dtype != dtype:
    return x.astype(dtype)
  return x


def _read_one(file: str, name: str, dtype):
  from safetensors import safe_open
  with safe_open(file, framework="np") as f:
    x = f.get_tensor(name)
  return cast(x, dtype)


class _Reader:
  """A zero-argument reader of one tensor that knows the shape and dtype its file's header
  declares, so `to_flax` checks both before any data is read. `span` (numpy dtype, start, end):
  where a URL's tensor lies in its file, fetched by one ranged read."""

  def __init__(self, file: str, name: str, dtype, shape, header_dtype: str, span=None):
    self.file, self.name, self.dtype, self.span = file, name, dtype, span
    self.shape, self.header_dtype = tuple(int(n) for n in shape), header_dtype

  @property
  def is_float(self) -> bool:
    # safetensors' dtype codes: F16, F32, F64, BF16, F8_E4M3, ... ; I*, U*, BOOL are not floats.
    return self.header_dtype.startswith(("F", "BF"))

  def __call__(self):
    if self.span is None:
      return _read_one(self.file, self.name, self.dtype)
    np_dtype, start, end = self.span
    data = paths.read_bytes(self.file, start, end)
    if len(data) != end - start:
      raise CheckpointError(f"{self.file!r} is truncated: tensor {self.name!r} needs bytes "
                            f"{start}..{end}, the file gave {len(data)}. Re-upload the folder.")
    return cast(np.frombuffer(data, np_dtype).reshape(self.shape), self.dtype)


# safetensors' dtype codes that a checkpoint of ours may hold, as numpy / ml_dtypes types.
_SAFETENSORS_DTYPES = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "U16": "uint16", "I16": "int16",
    "U32": "uint32", "I32": "int32", "U64": "uint64", "I64": "int64", "F16": "float16",
    "F32": "float32", "F64": "float64", "BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2"}
_MAX_HEADER = 100_000_000  # the bound safetensors itself puts on a header


def _url_header(url: str) -> dict[str, tuple]:
  """{name: (shape, code, numpy dtype, start, end)} of a safetensors file at a URL, from its
  header alone (a ranged read or two), every entry checked against the file's size."""
  bad = lambda why: CheckpointError(  # noqa: E731
      f"{url!r} is not a valid safetensors file ({why}). Re-upload or re-download the folder.")
  size = paths.getsize(url)
  head = paths.read_bytes(url, 0, min(size, 1 << 16))
  if len(head) < 8:
    raise bad("shorter than its 8-byte header length")
  n = int.from_bytes(head[:8], "little")
  if n > _MAX_HEADER or 8 + n > size:
    raise bad(f"a header of {n} bytes in a file of {size}")
  raw = head[8:8 + n] if 8 + n <= len(head) else paths.read_bytes(url, 8, 8 + n)
  try:
    header = json.loads(raw)
  except (ValueError, UnicodeDecodeError) as e:
    raise bad(f"its header is not JSON: {e}") from None
  if not isinstance(header, dict):
    raise bad("its header is not a JSON object")
  out, data_size = {}, size - 8 - n
  for name, entry in header.items():
    if name == "__metadata__":
      continue
    try:
      code, shape, (start, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
      ok = (all(isinstance(d, int) and d >= 0 for d in shape)
            and isinstance(start, int) and isinstance(end, int) and 0 <= start <= end <= data_size)
    except (KeyError, TypeError, ValueError):
      ok = False
    if not ok:
      raise bad(f"tensor {name!r} has no valid dtype, shape and data_offsets within the file")
    if code not in _SAFETENSORS_DTYPES:
      raise bad(f"tensor {name!r} has dtype {code!r}, which doran_jax does not read")
    np_dtype = as_numpy_dtype(_SAFETENSORS_DTYPES[code])
    if end - start != int(np.prod(shape, dtype=np.int64)) * np_dtype.itemsize:
      raise bad(f"tensor {name!r}: {end - start} bytes for shape {shape} of {code}")
    out[name] = (tuple(shape), code, np_dtype, 8 + n + start, 8 + n + end)
  return out


def lazy_state(path: str, *, dtype=None) -> dict[str, Callable[[], np.ndarray]]:
  """{torch name: zero-argument reader}: nothing is read until a reader is called.

  `to_flax` accepts it in place of `read_state`'s dict, so a loader can place each tensor on
  its devices as it is read and hold only one tensor on the host at a time. Each reader carries
  the header's shape and dtype, which `to_flax` checks before reading (a header claiming a huge
  tensor costs nothing).

  Example:
    >>> params, missing, unused = to_flax(lazy_state("ckpt/"), abstract, place=put_on_mesh)
  """
  out = {}
  for file in weight_files(path):
    out.update(lazy_file(file, dtype=dtype))
  return out


def lazy_file(file: str, *, dtype=None) -> dict[str, Callable[[], np.ndarray]]:
  """`lazy_state` of one safetensors file (a PEFT adapter's, say): {name: reader} from the header
  alone; each reader has `.shape`, `.header_dtype` and `.is_float` for `check_tensor`.

  Example:
    >>> readers = lazy_file("peft/adapter_model.safetensors")
    >>> readers[name].shape, readers[name].header_dtype
    ((8, 384), 'F32')
  """
  from safetensors import safe_open
  dtype = as_numpy_dtype(dtype)
  if paths.is_remote(file):
    return {name: _Reader(file, name, dtype, shape, code, span=(np_dtype, start, end))
            for name, (shape, code, np_dtype, start, end) in _url_header(file).items()}
  out = {}
  with safe_open(file, framework="np") as f:
    for name in f.keys():
      header = f.get_slice(name)
      out[name] = _Reader(file, name, dtype, header.get_shape(), header.get_dtype())
  return out


def read_state(path: str, *, dtype=None) -> dict[str, np.ndarray]:
  """All tensors of a checkpoint folder (single file or sharded) as {torch name: host array}.

  Example:
    >>> state = read_state("ckpt/", dtype=ml_dtypes.bfloat16)
    >>> state["embeddings.word_embeddings.weight"].dtype
    dtype(bfloat16)
  """
  return dict(iter_state(path, dtype=dtype))


# ------------------------------------------------------------------------------------ naming

def torch_name(our_path: str) -> str:
  """Our '/'-joined param path -> its PyTorch state-dict name.

  Example:
    >>> torch_name("bert/encoder/layer/0/attention/self/query/kernel")
    'bert.encoder.layer.0.attention.self.query.weight'
  """
  *head, leaf = our_path.split(SEP)
  return ".".join(head + ["weight" if leaf in _WEIGHT_LEAVES else leaf])


def _torch_to_flax_axes(ndim: int) -> tuple[int, ...]:
  """Linear (O, I) -> (I, O); conv (O, I, *K) -> (*K, I, O)."""
  return (1, 0) if ndim == 2 else tuple(range(2, ndim)) + (1, 0)


def _from_torch_layout(x, our_path: str, transpose: bool):
  if our_path.rsplit(SEP, 1)[-1] != "kernel" or not transpose or x.ndim < 2:
    return x
  return np.transpose(x, _torch_to_flax_axes(x.ndim))


def _our_shape(shape, our_path: str, transpose: bool) -> tuple[int, ...]:
  """A torch-layout shape in our layout (as `_from_torch_layout` would make it)."""
  shape = tuple(shape)
  if our_path.rsplit(SEP, 1)[-1] != "kernel" or not transpose or len(shape) < 2:
    return shape
  return tuple(shape[i] for i in _torch_to_flax_axes(len(shape)))


def check_tensor(original: str, path: str, shape, is_float: bool, dtype_name: str, spec,
                 transpose: bool = False) -> None:
  """A checkpoint tensor's declared shape and dtype against the model's leaf, before reading.

  `spec` has the leaf's `.shape` and `.dtype` (in our layout; `transpose`: the checkpoint's is
  torch's). A float leaf stored as an integer is refused: a CheckpointError naming both.

  Example:
    >>> r = lazy_file(file)[name]
    >>> check_tensor(name, "q/lora_a", r.shape, r.is_float, r.header_dtype,
    ...              jax.ShapeDtypeStruct((384, 8), jnp.float32))
  """
  ours, want = _our_shape(shape, path, transpose), tuple(spec.shape)
  if ours != want:
    layout = "" if ours == tuple(shape) else f" (torch layout; {ours} in ours)"
    raise CheckpointError(f"shape mismatch for {original!r} -> {path!r}: the checkpoint has "
                          f"{tuple(shape)}{layout}, the model expects {want}.")
  spec_dtype = getattr(spec, "dtype", None)
  if spec_dtype is not None and _is_float(spec_dtype) and not is_float:
    raise CheckpointError(f"{original!r} -> {path!r} is stored as {dtype_name}, but the model "
                          f"expects a floating-point {path.rsplit(SEP, 1)[-1]}; the checkpoint is "
                          "damaged or not this model's. Fix or re-download it.")


def _to_torch_layout(x, our_path: str, transpose: bool):
  if our_path.rsplit(SEP, 1)[-1] != "kernel" or not transpose or x.ndim < 2:
    return x
  return np.transpose(x, np.argsort(_torch_to_flax_axes(x.ndim)))


def _fullmatch(pattern: str, path: str) -> bool:
  return bool(pattern) and re.fullmatch(pattern, path) is not None


def _flat(tree) -> dict[str, Any]:
  if hasattr(tree, "unfreeze"):
    tree = tree.unfreeze()
  return {SEP.join(k): v for k, v in traverse_util.flatten_dict(dict(tree)).items()}


def _nest(flat: Mapping[str, Any]) -> dict:
  return traverse_util.unflatten_dict({tuple(k.split(SEP)): v for k, v in flat.items()})


def _candidates(name: str, prefix: str) -> list[str]:
  """A name as our model spells it, then with the base-model prefix removed or added.

  A bare-model checkpoint (BertModel: `embeddings...`) loads into a task model (`bert.embeddings...`)
  and a task checkpoint into a bare model, as transformers' base_model_prefix does.
  """
  if not prefix:
    return [name]
  p = prefix + "."
  return [name, name[len(p):]] if name.startswith(p) else [name, p + name]


def to_flax(state: Mapping[str, Any], abstract_params, *, no_transpose: str = r"",
            renames: Sequence[tuple[str, str]] = (), tied: Sequence[tuple[str, str]] = (),
            prefix: str = "", place: Optional[Callable[[str, np.ndarray], Any]] = None
            ) -> tuple[dict, list[str], list[str]]:
  """Builds the nested param dict of `abstract_params` from a torch-named state dict.

  Args:
    state: {torch name: array} (e.g. `read_state(path)`); arrays keep their dtype.
    abstract_params: the module's param tree (arrays or jax.ShapeDtypeStruct), e.g.
      `jax.eval_shape(module.init, key, batch)["params"]`; only shapes and structure are used.
    no_transpose: regex (full match over our paths) of 2-D kernels torch already stores (in, out).
    renames: (regex, replacement) pairs applied in order (`re.sub`) to checkpoint names first, for
      checkpoints whose names differ from the rule (old BERT's `LayerNorm.gamma`).
    tied: (our_path, source_our_path) pairs: a leaf the checkpoint lacks is filled from the source
      (transposed when only that fits, as a tied lm_head from the embedding); a pair whose path
      the model does not have is skipped.
    prefix: the base model's prefix ('bert'); names are also tried without or with it.
    place: (our path, host array in our layout) -> the leaf to keep (e.g. a device array in its
      final sharding); called as each tensor is converted, so with `lazy_state` only one tensor
      is on the host at a time.

  Returns:
    (params, missing, unused): params holds only the leaves found (host arrays, our layout);
    missing lists our paths the checkpoint lacks (a fresh head: initialise and log them); unused
    lists checkpoint names no leaf took.

  Example:
    >>> params, missing, unused = to_flax(state, abstract, prefix="bert")
    >>> missing
    ['classifier/bias', 'classifier/kernel']
  """
  renamed = {}
  for name, x in state.items():
    new = name
    for pattern, repl in renames:
      new = re.sub(pattern, repl, new)
    if new in renamed:
      raise ValueError(f"renames map two checkpoint tensors to {new!r} (one of them {name!r}).")
    renamed[new] = (name, x)

  flat_abstract = _flat(abstract_params)
  if flat_abstract and all(p.startswith("params" + SEP) for p in flat_abstract):
    raise ValueError("to_flax takes the param tree (variables['params']), not the variables dict.")
  out, missing, taken = {}, [], set()
  for path, spec in flat_abstract.items():
    found = next((c for c in _candidates(torch_name(path), prefix) if c in renamed), None)
    if found is None:
      missing.append(path)
      continue
    original, x = renamed[found]
    transpose = not _fullmatch(no_transpose, path)
    if isinstance(x, _Reader):
      # From the header alone: a tensor that cannot fit is refused before its data is read.
      check_tensor(original, path, x.shape, x.is_float, x.header_dtype, spec, transpose)
    x = x() if callable(x) else x
    check_tensor(original, path, x.shape, _is_float(x.dtype), np.dtype(x.dtype).name, spec,
                  transpose)
    y = _from_torch_layout(x, path, transpose)
    out[path] = y if place is None else place(path, np.ascontiguousarray(y))
    del x, y
    taken.add(found)

  for path, source in tied:
    # Loaded from the checkpoint, or not a param of this model (a head that reads the embedding).
    if path not in missing:
      continue
    if source not in out:
      raise ValueError(f"tied param {path!r}: its source {source!r} was not loaded.")
    want = tuple(flat_abstract[path].shape)
    x = out[source]
    if tuple(x.shape) == want:
      out[path] = x
    elif x.ndim == 2 and tuple(x.shape[::-1]) == want:
      out[path] = x.T
    else:
      raise ValueError(f"shape mismatch for tied {path!r} (expects {want}) from {source!r} "
                       f"{tuple(x.shape)}.")
    missing.remove(path)

  unused = sorted(orig for new, (orig, _) in renamed.items() if new not in taken)
  return _nest(out), missing, unused


# ------------------------------------------------------------------------------------ writing

def to_torch_names(params, *, no_transpose: str = r"",
                   drop: Sequence[str] = ()) -> dict[str, np.ndarray]:
  """Our params -> {torch name: contiguous host array} in torch's layouts (dtypes kept).

  Example:
    >>> sd = to_torch_names(params)
    >>> sd["bert.encoder.layer.0.attention.self.query.weight"].shape   # (out, in)
    (32, 32)
  """
  out = {}
  drop = set(drop)
  for path, x in _flat(params).items():
    if path in drop:
      continue
    host = np.asarray(x)
    out[torch_name(path)] = np.ascontiguousarray(
        _to_torch_layout(host, path, not _fullmatch(no_transpose, path)))
  return out


def save_pretrained(params, hf_config_dict: Mapping[str, Any], path: str, *,
                    no_transpose: str = r"", drop: Sequence[str] = (),
                    max_shard_bytes: Optional[int] = None, overwrite: bool = False,
                    sources: Sequence[Optional[str]] = ()) -> list[str]:
  """Writes `config.json` + `model.safetensors` (or shards + index) loadable by transformers.

  Args:
    params: our param tree (jax or numpy arrays; their dtypes are written).
    hf_config_dict: the transformers config as a dict (e.g. `read_config(src)`), written as is.
    path: output folder (created). Never a symlink or one of `sources`; an existing folder
      must be empty unless `overwrite` (`files.check_output_folder`).
    no_transpose: as in `to_flax`.
    drop: our paths not to write (a tied lm_head; transformers re-ties it on load).
    max_shard_bytes: split into shards of about this size, one shard in host memory at a time.
    overwrite: replace the files of a non-empty folder (our weight files, index and config).
    sources: folders that must never be written (the backbone's own source, `Backbone.source`).

  Returns:
    The weight files written.

  Example:
    >>> save_pretrained(params, read_config("ckpt/"), "out/", drop=("lm_head/kernel",))
  """
  from safetensors.numpy import save_file
  path = check_output_folder(path, overwrite=overwrite, sources=sources, what="save_pretrained target")
  paths.makedirs(path)
  drop = set(drop)
  flat = {p: x for p, x in _flat(params).items() if p not in drop}
  # Group our paths into shards by byte size before converting, so only one shard is on the host.
  shards, size = [[]], 0
  for p, x in flat.items():
    nbytes = int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
    if max_shard_bytes and shards[-1] and size + nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(p)
    size += nbytes
  # transformers rejects safetensors files without this metadata.
  meta = {"format": "pt"}
  # A previous save's files would otherwise shadow or mix with these (the index wins on load).
  for stale in paths.listdir(path) if paths.isdir(path) else []:
    if stale in (WEIGHTS, INDEX) or re.fullmatch(r"model-\d+-of-\d+\.safetensors", stale):
      paths.remove(paths.join(path, stale))
  write_json(paths.join(path, CONFIG), dict(hf_config_dict), indent=2, sort_keys=True)
  if len(shards) == 1:
    with replacing(paths.join(path, WEIGHTS)) as tmp:
      save_file(to_torch_names(_nest({p: flat[p] for p in shards[0]}), no_transpose=no_transpose),
                tmp, metadata=meta)
    return [paths.join(path, WEIGHTS)]
  files, weight_map, total = [], {}, 0
  for i, group in enumerate(shards):
    name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    tensors = to_torch_names(_nest({p: flat[p] for p in group}), no_transpose=no_transpose)
    with replacing(paths.join(path, name)) as tmp:
      save_file(tensors, tmp, metadata=meta)
    weight_map.update({k: name for k in tensors})
    total += sum(v.nbytes for v in tensors.values())
    files.append(paths.join(path, name))
    del tensors
  write_json(paths.join(path, INDEX), {"metadata": {"total_size": total}, "weight_map": weight_map})
  return files
