"""The XLA:CPU defaults doran_jax sets on import (doran_jax/xla_cpu.py)."""

import os
import subprocess
import sys

from doran_jax import xla_cpu

FLAG = xla_cpu.FLAGS[0]


def test_added_once_next_to_other_flags_never_over_the_users():
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  assert xla_cpu.apply_defaults(env, "0.10.2") == (FLAG,)
  assert env["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=8 {FLAG}"
  assert xla_cpu.apply_defaults(env, "0.10.2") == ()          # already there: not repeated
  mine = {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=dot"}
  assert xla_cpu.apply_defaults(mine, "0.10.2") == ()
  assert mine["XLA_FLAGS"] == "--xla_cpu_experimental_ynn_fusion_type=dot"
  empty = {}
  assert xla_cpu.apply_defaults(empty, "0.10.2") == (FLAG,) and empty["XLA_FLAGS"] == FLAG


def test_opt_out_and_other_jaxlib_versions_leave_xla_flags_alone():
  off = {"DORAN_XLA_CPU_DEFAULTS": "0"}
  assert xla_cpu.apply_defaults(off, "0.10.2") == () and "XLA_FLAGS" not in off
  newer = {}
  assert xla_cpu.apply_defaults(newer, "0.11.2") == () and "XLA_FLAGS" not in newer


def test_importing_doran_jax_keeps_dots_out_of_ynnpack_fusions():
  code = ("import doran_jax, jax, jax.numpy as jnp; "
          "print('ynn' in jax.jit(lambda a: jnp.tanh(a @ a)).lower(jnp.ones((64, 64)))"
          ".compile().as_text())")
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "DORAN_XLA_CPU_DEFAULTS")}
  env["JAX_PLATFORMS"] = "cpu"
  run = lambda extra: subprocess.run([sys.executable, "-c", code], env={**env, **extra},  # noqa: E731
                                     capture_output=True, text=True, check=True).stdout.strip()
  assert run({}) == "False"
  # Not vacuous: the same program without our defaults does use YNNPACK fusions.
  assert run({"DORAN_XLA_CPU_DEFAULTS": "0"}) == "True"
