"""One jit trainer from one device to many: 8 simulated CPU devices in subprocesses."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "multidevice_worker.py"


def run_worker(n_devices, workdir, data, **kw):
  env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={n_devices}",
         "JAX_PLATFORMS": "cpu"}
  cmd = [sys.executable, str(WORKER), "--workdir", str(workdir), "--data", str(data)]
  for k, v in kw.items():
    cmd += [f"--{k.replace('_', '-')}", str(v)]
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1]
  return json.loads(line[len("RESULT "):])


@pytest.mark.slow
def test_meshes_match_one_device(tmp_path, shared_data):
  meshes = "1x1x1,8x1x1,2x4x1,2x2x2"
  out = run_worker(8, tmp_path, shared_data / "text" / "sst2", methods="lora,dora,doran",
                   meshes=meshes, steps=3)
  assert out["devices"] == 8
  for method in ("lora", "dora", "doran"):
    ref = out[f"{method}_1x1x1"]
    for mesh in meshes.split(",")[1:]:
      got = out[f"{method}_{mesh}"]
      np.testing.assert_allclose(got["losses"], ref["losses"], rtol=1e-5, atol=1e-6,
                                 err_msg=f"{method} on {mesh}")
      for name, values in ref["adapters"].items():
        np.testing.assert_allclose(got["adapters"][name], values, rtol=1e-5, atol=1e-5,
                                   err_msg=f"{method} {name} on {mesh}")
  # The tensor-parallel rule really sharded the attention kernels on the bigger meshes.
  specs = out["dora_2x2x2"]["kernel_specs"]
  assert any("fsdp" in s and "model" in s for s in specs.values()), specs


@pytest.mark.slow
def test_checkpoint_from_8_devices_resumes_on_1(tmp_path, shared_data):
  data = shared_data / "text" / "sst2"
  straight = run_worker(1, tmp_path / "straight", data, methods="dora", meshes="1x1x1", steps=6)
  first = run_worker(8, tmp_path / "moved", data, methods="dora", meshes="2x2x2", steps=6,
                     max_steps=3)
  assert first["dora_2x2x2"]["status"] == "paused"
  # Same workdir layout on one device: resume the 8-device checkpoint.
  os.rename(tmp_path / "moved" / "dora_2x2x2", tmp_path / "moved" / "dora_1x1x1")
  second = run_worker(1, tmp_path / "moved", data, methods="dora", meshes="1x1x1", steps=6)
  losses = first["dora_2x2x2"]["losses"] + second["dora_1x1x1"]["losses"]
  np.testing.assert_allclose(losses, straight["dora_1x1x1"]["losses"], rtol=1e-5, atol=1e-6)
