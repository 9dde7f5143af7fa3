"""XLA:CPU settings that train faster on the CPUs we measured, set before JAX compiles anything.

jaxlib 0.10 hands a CPU program's dots, with the elementwise work XLA fuses around them, to
YNNPACK fusions. In a MiniLM DoRA training step (batch 32 × 128, 2-core AMD EPYC) those fusions
ran the step's matmuls at about half the rate the same shapes reach as plain XLA dots, and held
0.25 GB more: switching them off took the step from 2.75 to 2.29-2.47 s (interleaved runs,
benchmarks/step.py; docs/benchmarks.md). Importing `doran_jax` applies these
defaults (doran_jax/__init__.py), so train.py, the scripts, notebooks and tests all get them.

It never overrides a flag already named in XLA_FLAGS (set `--xla_cpu_experimental_ynn_fusion_type=
dot` there to keep YNNPACK dots), does nothing with DORAN_XLA_CPU_DEFAULTS=0 or on a jaxlib other
than the 0.10 line these flags were measured on, and has no effect once the process has compiled
its first JAX computation (XLA reads its flags once).

Example:
  >>> from doran_jax import xla_cpu
  >>> xla_cpu.apply_defaults()          # before the first jax computation
  ('--xla_cpu_experimental_ynn_fusion_type=',)
"""

from __future__ import annotations

import os
from typing import MutableMapping, Optional

# An empty list of YNNPACK fusion types: dots and their neighbours stay XLA's own.
FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=",)
MEASURED_JAXLIB = "0.10."


def apply_defaults(environ: Optional[MutableMapping[str, str]] = None,
                   jaxlib_version: Optional[str] = None) -> tuple[str, ...]:
  """Appends each of FLAGS whose name XLA_FLAGS does not set yet; returns the flags added."""
  env = os.environ if environ is None else environ
  if env.get("DORAN_XLA_CPU_DEFAULTS", "1") == "0":
    return ()
  if jaxlib_version is None:
    import jaxlib
    jaxlib_version = jaxlib.__version__
  if not jaxlib_version.startswith(MEASURED_JAXLIB):
    return ()   # another jaxlib may not know these flags, and XLA aborts on unknown ones
  current = env.get("XLA_FLAGS", "")
  added = tuple(f for f in FLAGS if f.split("=", 1)[0] + "=" not in current)
  if added:
    env["XLA_FLAGS"] = " ".join([current.strip(), *added]).strip()
  return added
