"""Device mesh, partition rules and shardings: JAX's SPMD partitioner does the distribution.

Rules are an ordered list of (regex over '/'-joined param paths, PartitionSpec tuple), big_vision
style: the first full match wins and every match is logged. Adapter leaves follow their kernel:
A (in, r) takes the kernel's input-axis spec, B (r, out) and the magnitude (out,) its output-axis spec.
"""

from __future__ import annotations

import math
import os
import re
import socket
import time
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from doran_jax import quant
from doran_jax.adapters import method as method_registry
from doran_jax.adapters.core import targets_for
from doran_jax.errors import ConfigError
from doran_jax.targets import SEP, flatten, unflatten

BATCH_AXES = ("data", "fsdp")

# Kernels are given in their logical (in, out) layout; a kernel stored as (out, in) gets the
# spec reversed (param_specs' `transposed`). Tensor-parallel rules come from the model family.
FSDP_RULES = ((r".*/(kernel|embedding)", ("fsdp", None)), (r".*", ()))
REPLICATED_RULES = ((r".*", ()),)
RULE_NAMES = ("replicated", "fsdp", "tensor_parallel")
DISTRIBUTED_MODES = ("auto", "off", "on")


def rules_for(name_or_rules, family) -> tuple:
  """'replicated' | 'fsdp' | 'tensor_parallel' (the family's column/row rules) | explicit rules."""
  if isinstance(name_or_rules, str):
    named = {"replicated": REPLICATED_RULES, "fsdp": FSDP_RULES,
             "tensor_parallel": family.tensor_parallel_rules()}
    if name_or_rules not in named:
      raise ValueError(f"unknown sharding_rules {name_or_rules!r}; choose {', '.join(named)} or "
                       "a list of (regex, spec) pairs.")
    return named[name_or_rules]
  return tuple((r, tuple(s)) for r, s in name_or_rules)


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


def param_specs(params, mesh: Mesh, rules, transposed=()) -> dict:
  """PartitionSpec per leaf from the first matching rule (each match logged).

  Rules give kernels in (in, out) order; for the `transposed` paths (stored (out, in)) the
  spec's two axes are swapped.
  """
  compiled = [(re.compile(r), spec) for r, spec in rules]
  transposed = frozenset(transposed)
  specs = {}
  for path, leaf in flatten(params).items():
    for regex, spec in compiled:
      if regex.fullmatch(path):
        if path in transposed and len(spec) == 2:
          spec = tuple(reversed(spec))
        specs[path] = _fit_spec(spec, np.shape(leaf), mesh, path)
        logging.log_every_n(logging.INFO, "sharding: %s %s -> %s", 1, path, np.shape(leaf), specs[path])
        break
    else:
      raise ValueError(f"no partition rule matches {path!r}; end the rules with ('.*', ()).")
  return unflatten(specs)


def adapter_specs(adapters, params, kernel_specs, cfg, mesh: Mesh) -> dict:
  """Adapter leaves follow their kernel's sharding through their declared logical axes.

  'in' takes the kernel's input-axis spec, 'out' its output-axis spec, 'rank' is never split;
  a leaf the method does not declare is an error. Generator params (DoRAN) are replicated.
  """
  flat_k = flatten(kernel_specs)
  flat_a = flatten(adapters.get("targets", {}))
  out = {}
  if flat_a:
    axes = method_registry.get(cfg.method).leaf_axes(cfg)
    by_module = {t.module_path: t for t in targets_for(params, cfg)}
    for path, leaf in flat_a.items():
      module, name = path.rsplit(SEP, 1) if SEP in path else ("", path)
      if name not in axes or module not in by_module:
        raise ValueError(f"adapter leaf {path!r} is not declared by method {cfg.method!r} "
                         f"(it declares {sorted(axes)}); add it to the method's leaf_axes.")
      t = by_module[module]
      k_spec = tuple(flat_k[t.path]) + (None, None)
      in_axis, out_axis = (k_spec[1], k_spec[0]) if t.transposed else (k_spec[0], k_spec[1])
      spec = tuple({"in": in_axis, "out": out_axis, "rank": None}[a] for a in axes[name])
      out[path] = _fit_spec(spec, np.shape(leaf), mesh, "adapters/" + path)
  result = {"targets": unflatten(out)}
  for key, tree in adapters.items():
    if key != "targets":  # generator params: small and shared by every target, replicated
      result[key] = jax.tree_util.tree_map(lambda _: P(), tree)
  return result


def state_shardings_like(abstract_tree, known: dict[str, Any], mesh: Mesh):
  """Shardings for a tree (an optimizer state) whose leaves mirror known '/'-paths.

  A leaf whose dict-key path ends with a path in `known` (and has its shape) takes that
  leaf's sharding; everything else (counts, scalars) is replicated on the mesh.
  """
  replicated = NamedSharding(mesh, P())

  def pick(key_path, leaf):
    keys = [str(k.key) for k in key_path if isinstance(k, jax.tree_util.DictKey)]
    for i in range(len(keys)):
      hit = known.get(SEP.join(keys[i:]))
      if hit is not None and tuple(hit[0]) == tuple(np.shape(leaf)):
        return hit[1]
    return replicated

  return jax.tree_util.tree_map_with_path(pick, abstract_tree)


def abstract(tree):
  """ShapeDtypeStructs with each leaf's sharding: the target of an orbax restore."""
  return jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)


def quantized_specs(q, spec, mesh: Mesh, path: str = ""):
  """Per-array specs of a quant.QuantizedKernel from its logical (in, out) kernel spec.

  2-D arrays (codes, nf4 block absmax: rows along the input axis) take the kernel's spec, (out,)
  arrays (int8 scales, ‖W0‖²) its output axis; double quantisation's flat arrays are replicated.
  """
  spec = tuple(spec) + (None, None)

  def one(x):
    shape = np.shape(x)
    if len(shape) == 2:
      return _fit_spec(spec[:2], shape, mesh, path)
    if len(shape) == 1 and shape[0] == q.shape[1]:
      return _fit_spec(spec[1:2], shape, mesh, path)
    return P()

  return jax.tree_util.tree_map(one, q)


def named(mesh: Mesh, specs, like=None):
  """NamedShardings for a spec tree; with `like` (the params the specs are for), a quantised
  kernel's one logical spec becomes one spec per stored array (`quantized_specs`)."""
  if like is not None and quant.any_quantized(like):
    flat_like, flat_specs = flatten(like), flatten(specs)
    specs = unflatten({p: quantized_specs(flat_like[p], s, mesh, p) if quant.is_quantized(
        flat_like.get(p)) else s for p, s in flat_specs.items()})
  return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), specs,
                                is_leaf=lambda x: isinstance(x, P))


def batch_spec(mesh: Mesh) -> P:
  axes = tuple(a for a in BATCH_AXES if a in mesh.shape and mesh.shape[a] > 1)
  return P(axes if axes else None)


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles the global batch from this process's rows, sharded along the batch axes."""
  sharding = NamedSharding(mesh, batch_spec(mesh))
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}


# Variables a multi-host launcher sets; any of them makes distributed='auto' initialise.
LAUNCHER_ENV = ("COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES",
                "SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")
# Seconds to wait for every process to reach the coordinator (JAX's default is 300).
DEFAULT_INIT_TIMEOUT_S = 120


def distributed_args(environ) -> dict:
  """jax.distributed.initialize's arguments from the environment.

  JAX 0.10 reads only the coordinator address from the environment, so JAX_NUM_PROCESSES and
  JAX_PROCESS_ID (the manual launch in docs/scaling.md) are passed explicitly; without them JAX detects
  the cluster itself (SLURM, TPU pods, Kubernetes). DORAN_DISTRIBUTED_TIMEOUT bounds the wait.

  Example:
    >>> distributed_args({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "2",
    ...                   "JAX_PROCESS_ID": "1"})
    {'initialization_timeout': 120, 'coordinator_address': '10.0.0.1:1234', 'num_processes': 2, 'process_id': 1}
  """
  timeout = environ.get("DORAN_DISTRIBUTED_TIMEOUT", str(DEFAULT_INIT_TIMEOUT_S))
  if not timeout.isdigit() or int(timeout) < 1:
    raise ConfigError(f"DORAN_DISTRIBUTED_TIMEOUT={timeout!r} must be a whole number of seconds "
                      ">= 1.")
  out = {"initialization_timeout": int(timeout)}
  address = environ.get("JAX_COORDINATOR_ADDRESS") or environ.get("COORDINATOR_ADDRESS")
  count, index = environ.get("JAX_NUM_PROCESSES"), environ.get("JAX_PROCESS_ID")
  if count is None and index is None:
    return out
  if count is None or index is None or not count.isdigit() or not index.isdigit():
    raise ConfigError(f"JAX_NUM_PROCESSES={count!r} and JAX_PROCESS_ID={index!r}: set both, to "
                      "the number of processes and this process's index (0 on the coordinator).")
  if not 0 <= int(index) < int(count):
    raise ConfigError(f"JAX_PROCESS_ID={index} must be in 0..{int(count) - 1} for "
                      f"JAX_NUM_PROCESSES={count}.")
  if not address:
    raise ConfigError("JAX_NUM_PROCESSES is set but JAX_COORDINATOR_ADDRESS is not: set it to "
                      "host:port of process 0, the same on every process.")
  return {**out, "coordinator_address": address, "num_processes": int(count),
          "process_id": int(index)}


def _wait_for_coordinator(address: str, timeout_s: int) -> None:
  """Waits until process 0's coordinator accepts TCP connections: JAX aborts the process (a C++
  check failure, no Python exception) when its own connect times out, so an unreachable
  coordinator is caught here first."""
  host, _, port = address.rpartition(":")
  if not host or not port.isdigit():
    raise ConfigError(f"JAX_COORDINATOR_ADDRESS={address!r} must be host:port (of process 0).")
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      with socket.create_connection((host.strip("[]"), int(port)), timeout=2):
        return
    except OSError as e:
      if time.monotonic() > deadline:
        raise ConfigError(
            f"the coordinator {address} (process 0) did not answer within {timeout_s} s "
            f"({type(e).__name__}: {e}). Start process 0 with the same JAX_COORDINATOR_ADDRESS, "
            "check the host and port are reachable from here, or raise "
            "DORAN_DISTRIBUTED_TIMEOUT.") from None
      time.sleep(0.5)


def maybe_initialize_distributed(distributed: str) -> None:
  """jax.distributed.initialize() when asked ('on'), or 'auto' under a known multi-host launcher;
  a no-op once initialised. Call it before anything else touches JAX (the entry points do).

  Raises:
    ConfigError: a bad launch environment, or processes that did not all reach the coordinator
      within DORAN_DISTRIBUTED_TIMEOUT seconds.
  """
  if distributed not in DISTRIBUTED_MODES:
    raise ConfigError(f"unknown distributed={distributed!r}; choose auto, on or off.")
  if jax.distributed.is_initialized():
    return
  if not (distributed == "on" or (distributed == "auto" and
                                  any(os.environ.get(k) for k in LAUNCHER_ENV))):
    return
  kwargs = distributed_args(os.environ)
  if kwargs.get("process_id"):
    _wait_for_coordinator(kwargs["coordinator_address"], kwargs["initialization_timeout"])
  try:
    jax.distributed.initialize(**kwargs)
  except Exception as e:  # pylint: disable=broad-except  (XlaRuntimeError, RuntimeError, ...)
    where = kwargs.get("coordinator_address", "the coordinator JAX detected")
    raise ConfigError(
        f"jax.distributed.initialize could not connect the processes (coordinator {where}, "
        f"{kwargs.get('num_processes', 'auto')} processes, waited at most "
        f"{kwargs['initialization_timeout']} s): {type(e).__name__}: {str(e).splitlines()[0]}. "
        "Start every process with the same JAX_COORDINATOR_ADDRESS (host:port of process 0, "
        "reachable from all) and JAX_NUM_PROCESSES, and a distinct JAX_PROCESS_ID; or pass "
        "--config.distributed=off for one process.") from e
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices",
               jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())