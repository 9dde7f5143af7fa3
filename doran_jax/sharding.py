"""Device mesh, partition rules and shardings: JAX's SPMD partitioner does the distribution.

Rules are an ordered list of (regex over '/'-joined param paths, PartitionSpec tuple), big_vision
style: the first full match wins and every match is logged. Adapter leaves follow their kernel:
A (in, r) takes the kernel's input-axis spec, B (r, out) and the magnitude (out,) its output-axis spec.
"""

from __future__ import annotations

import math
import re
from typing import Any, Sequence

import jax
import numpy as np
from absl import logging
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from doran_jax.targets import SEP, flatten, unflatten

BATCH_AXES = ("data", "fsdp")

# Defaults for the transformers Flax families (kernels are (in, out); GPT-2 Conv1D (out, in)).
FSDP_RULES = (
    (r".*/(kernel|embedding)", ("fsdp", None)),
    (r".*", ()),
)
TENSOR_PARALLEL_RULES = (
    (r".*/(query|key|value|q_proj|k_proj|v_proj|gate_proj|up_proj|intermediate/dense)/kernel",
     ("fsdp", "model")),
    (r".*/(attention/output/dense|o_proj|down_proj|output/dense)/kernel", ("model", "fsdp")),
    (r".*/(kernel|embedding)", ("fsdp", None)),
    (r".*", ()),
)
REPLICATED_RULES = ((r".*", ()),)


def parse_mesh(spec) -> list[tuple[str, int]]:
  """'data:-1,fsdp:2,model:1' (or a list of (name, size) pairs) -> [(name, size), ...]."""
  if not isinstance(spec, str):
    return [(str(n), int(s)) for n, s in spec]
  axes = []
  for item in spec.split(","):
    name, sep, size = item.strip().partition(":")
    if not sep or not name:
      raise ValueError(f"mesh {spec!r}: each axis must look like name:size, e.g. 'data:-1,fsdp:2'.")
    axes.append((name, int(size)))
  return axes


def make_mesh(axes, devices=None) -> Mesh:
  """Mesh from 'data:-1,fsdp:2' or [(name, size), ...]; one size may be -1 (remaining devices).

  Example:
    >>> mesh = make_mesh("data:-1,fsdp:1,model:1")
  """
  axes = parse_mesh(axes)
  devices = list(devices if devices is not None else jax.devices())
  names = [str(n) for n, _ in axes]
  sizes = [int(s) for _, s in axes]
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh {list(axes)}: at most one axis may have size -1.")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"mesh {list(axes)} does not divide {len(devices)} devices.")
    sizes[sizes.index(-1)] = len(devices) // known
  if -1 not in [int(s) for _, s in axes] and math.prod(sizes) < len(devices):
    logging.warning("mesh %s uses %d of the %d devices", dict(zip(names, sizes)), math.prod(sizes),
                    len(devices))
    devices = devices[:math.prod(sizes)]
  if math.prod(sizes) != len(devices):
    raise ValueError(f"mesh {dict(zip(names, sizes))} needs {math.prod(sizes)} devices; "
                     f"{len(devices)} are available. Use -1 for one axis to fill the rest.")
  return jax.make_mesh(sizes, names, axis_types=(AxisType.Auto,) * len(names), devices=devices)


def _fit_spec(spec, shape, mesh: Mesh, path: str):
  """Drops mesh axes that are absent or do not divide the dimension (logged), pads to ndim."""
  spec = tuple(spec)[:len(shape)] + (None,) * max(0, len(shape) - len(spec))
  fitted = []
  for dim, axis in zip(shape, spec):
    axes = (axis,) if isinstance(axis, str) else tuple(axis or ())
    axes = tuple(a for a in axes if a in mesh.shape and mesh.shape[a] > 1)
    size = math.prod(mesh.shape[a] for a in axes)
    if axes and dim % size:
      logging.info("sharding: %s dim %d not divisible by %s; replicated on that dim", path, dim, axes)
      axes = ()
    fitted.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return P(*fitted)


def param_specs(params, mesh: Mesh, rules) -> dict:
  """PartitionSpec per leaf from the first matching rule (each match logged)."""
  compiled = [(re.compile(r), spec) for r, spec in rules]
  specs = {}
  for path, leaf in flatten(params).items():
    for regex, spec in compiled:
      if regex.fullmatch(path):
        specs[path] = _fit_spec(spec, np.shape(leaf), mesh, path)
        logging.log_every_n(logging.INFO, "sharding: %s %s -> %s", 1, path, np.shape(leaf), specs[path])
        break
    else:
      raise ValueError(f"no partition rule matches {path!r}; end the rules with ('.*', ()).")
  return unflatten(specs)


def adapter_specs(adapters, params, kernel_specs, cfg, mesh: Mesh) -> dict:
  """Adapter leaves follow their kernel's sharding; DoRAN's generator is replicated."""
  from doran_jax.adapters.core import targets_for
  flat_k = flatten(kernel_specs)
  out = {}
  flat_a = flatten(adapters.get("targets", {}))
  by_module = {t.module_path: t for t in targets_for(params, cfg)} if flat_a else {}
  for path, leaf in flat_a.items():
    module, name = path.rsplit(SEP, 1)
    t = by_module[module]
    k_spec = tuple(flat_k[t.path]) + (None, None)
    in_axis, out_axis = (k_spec[1], k_spec[0]) if t.transposed else (k_spec[0], k_spec[1])
    spec = {"lora_a": (in_axis, None), "lora_b": (None, out_axis), "magnitude": (out_axis,),
            "tau": (out_axis,), "gate": (None,)}.get(name, ())
    out[path] = _fit_spec(spec, np.shape(leaf), mesh, "adapters/" + path)
  result = {"targets": unflatten(out)}
  if "hypernet" in adapters:
    result["hypernet"] = jax.tree_util.tree_map(lambda _: P(), adapters["hypernet"])
  return result


def named(mesh: Mesh, specs):
  return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), specs,
                                is_leaf=lambda x: isinstance(x, P))


def batch_spec(mesh: Mesh) -> P:
  axes = tuple(a for a in BATCH_AXES if a in mesh.shape and mesh.shape[a] > 1)
  return P(axes if axes else None)


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles the global batch from this process's rows, sharded along the batch axes."""
  sharding = NamedSharding(mesh, batch_spec(mesh))
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}


def maybe_initialize_distributed(distributed: str) -> None:
  """jax.distributed.initialize() when asked ('on'), or 'auto' under a known multi-host launcher."""
  import os
  launcher_env = ("COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID",
                  "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")
  if distributed not in ("auto", "off", "on"):
    raise ValueError(f"unknown distributed={distributed!r}; choose auto, on or off.")
  if distributed == "on" or (distributed == "auto" and any(os.environ.get(k) for k in launcher_env)):
    jax.distributed.initialize()
    logging.info("jax.distributed: process %d of %d, %d local / %d global devices",
                 jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())
