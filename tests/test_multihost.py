"""The documented multi-host launch (docs/scaling.md), run as written on localhost: two
processes with JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID and
--config.distributed=on train configs/tiny.py (lora, dora, doran; FSDP rules on a 2 x 2 mesh) to the losses, eval and final
adapters of one process with the same four devices."""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from doran_jax import errors, sharding

REPO = pathlib.Path(__file__).resolve().parents[1]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _command(shared_data, workdir, method="dora"):
  return [sys.executable, "train.py", "--config", f"configs/tiny.py:kind=text,method={method}",
          f"--config.data.path={shared_data / 'text' / 'sst2'}", f"--workdir={workdir}",
          "--config.num_steps=4", "--config.checkpoint.every=2", "--config.progress_bar=False",
          "--config.mesh=data:2,fsdp:2,model:1", "--config.sharding_rules=fsdp"]


def _env(devices, **extra):
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
  return {**env, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
          "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "USE_TORCH": "0", **extra}


def _losses(workdir):
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return [r["train/loss"] for r in records if "train/loss" in r]


def _launch(shared_data, workdir, processes, *flags, method="dora"):
  """train.py on 4 CPU devices: one process, or `processes` processes launched as
  docs/scaling.md says (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID,
  --config.distributed=on). Returns each process's stdout."""
  command = _command(shared_data, workdir, method) + list(flags)
  if processes == 1:
    proc = subprocess.run(command, cwd=REPO, env=_env(4), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [proc.stdout]
  port = _free_port()
  procs = [subprocess.Popen(command + ["--config.distributed=on"], cwd=REPO,
                            env=_env(4 // processes, JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
                                     JAX_NUM_PROCESSES=str(processes), JAX_PROCESS_ID=str(i)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(processes)]
  try:
    outs = [p.communicate(timeout=600) for p in procs]
  finally:
    for p in procs:
      p.kill()
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  return [out for out, _ in outs]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "dora", "doran"])
def test_readme_multihost_launch_equals_one_process(shared_data, tmp_path, method):
  one, two = tmp_path / "one", tmp_path / "two"
  _launch(shared_data, one, 1, method=method)
  outs = _launch(shared_data, two, 2, method=method)
  assert f"training {method} for 4 steps" in outs[0]
  assert "training " not in outs[1]  # only process 0 prints

  np.testing.assert_allclose(_losses(two), _losses(one), rtol=1e-5)
  ev_one = json.loads((one / "results.json").read_text())["eval"]
  ev_two = json.loads((two / "results.json").read_text())["eval"]
  assert ev_two["n"] == ev_one["n"]
  np.testing.assert_allclose(ev_two["accuracy"], ev_one["accuracy"])
  np.testing.assert_allclose(ev_two["eval_loss"], ev_one["eval_loss"], rtol=1e-5)
  # The final adapters too (each tensor of the export).
  from doran_jax import checkpoint
  from doran_jax.targets import flatten
  a_one = flatten(checkpoint.load_adapters(str(one / "export" / "adapters"))[0])
  a_two = flatten(checkpoint.load_adapters(str(two / "export" / "adapters"))[0])
  assert a_one.keys() == a_two.keys() and a_one
  for name in a_one:
    np.testing.assert_allclose(a_two[name], a_one[name], rtol=1e-5, atol=1e-6, err_msg=name)
  # Written once, by process 0: one record per step, one eval record, the export, no lock left.
  records = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records if "train/loss" in r] == [1, 2, 3, 4]
  assert len([r for r in records if "eval/accuracy" in r]) == 1
  assert json.loads((two / "export" / "adapters" / "checksums.json").read_text())
  assert not (two / "run.lock").exists()


@pytest.mark.slow
@pytest.mark.parametrize("first, then", [(2, 1), (1, 2)])
def test_a_checkpoint_resumes_across_process_counts(shared_data, tmp_path, first, then):
  # A constant lr, so stopping at step 3 and forcing the run on to 6 is the same run.
  flags = ("--config.optim.schedule=constant", "--config.checkpoint.every=3")
  straight = tmp_path / "straight"
  _launch(shared_data, straight, 1, "--config.num_steps=6", *flags)
  moved = tmp_path / "moved"
  _launch(shared_data, moved, first, "--config.num_steps=3", *flags)
  outs = _launch(shared_data, moved, then, "--config.num_steps=6", "--config.resume=force", *flags)
  assert "resumed from step 3" in outs[0]
  np.testing.assert_allclose(_losses(moved), _losses(straight), rtol=1e-5)


def test_launch_environment_is_passed_to_jax():
  args = sharding.distributed_args({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234",
                                    "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"})
  assert args == {"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3,
                  "initialization_timeout": sharding.DEFAULT_INIT_TIMEOUT_S}
  # SLURM, TPU pods, Kubernetes: JAX detects the cluster itself.
  assert sharding.distributed_args({"SLURM_JOB_ID": "7"}) == {
      "initialization_timeout": sharding.DEFAULT_INIT_TIMEOUT_S}


@pytest.mark.parametrize("environ, message", [
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2"}, "set both"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"},
     r"must be in 0\.\.1"),
    ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}, "JAX_COORDINATOR_ADDRESS is not"),
    ({"DORAN_DISTRIBUTED_TIMEOUT": "soon"}, "whole number of seconds"),
])
def test_a_bad_launch_environment_is_a_clear_error(environ, message):
  with pytest.raises(errors.ConfigError, match=message):
    sharding.distributed_args(environ)


def test_an_unreachable_coordinator_fails_within_the_timeout(tmp_path):
  # Process 1 of 2 waits for a coordinator that never starts: a one-line error, not a hang.
  port = _free_port()
  code = ("import sys; sys.path.insert(0, %r)\n"
          "from doran_jax import errors, sharding\n"
          "with errors.reported():\n"
          "  sharding.maybe_initialize_distributed('on')\n") % str(REPO)
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                        env=_env(1, JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
                                 JAX_NUM_PROCESSES="2", JAX_PROCESS_ID="1",
                                 DORAN_DISTRIBUTED_TIMEOUT="5"))
  assert proc.returncode == errors.EXIT_CODE, proc.stderr[-2000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert f"coordinator localhost:{port} (process 0) did not answer within 5 s" in last


@pytest.mark.slow
def test_sigterm_to_every_process_saves_once_and_exits_preempted(shared_data, tmp_path):
  # As a scheduler does: every process gets SIGTERM, not at the same moment.
  workdir = tmp_path / "run"
  port = _free_port()
  command = [a for a in _command(shared_data, workdir)
             if not a.startswith(("--config.num_steps", "--config.checkpoint.every"))]
  procs = [subprocess.Popen(command + ["--config.num_steps=100000", "--config.checkpoint.every=100000",
                                       "--config.distributed=on"], cwd=REPO,
                            env=_env(2, JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
                                     JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i),
                                     PYTHONUNBUFFERED="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  lines = []
  try:
    for line in procs[0].stdout:
      lines.append(line)
      if line.startswith("step 3/"):
        procs[0].send_signal(signal.SIGTERM)
        time.sleep(0.5)
        procs[1].send_signal(signal.SIGTERM)
        break
    # Before the fix the two stopped at different steps and hung in their collectives.
    outs = [p.communicate(timeout=120)[0] for p in procs]
  finally:
    for p in procs:
      p.kill()
  text = "".join(lines) + outs[0]
  assert [p.returncode for p in procs] == [errors.PREEMPTED_EXIT_CODE] * 2, text[-3000:] + outs[1][-3000:]
  saved = sorted(int(n) for n in os.listdir(workdir / "checkpoints") if n.isdigit())
  assert len(saved) == 1 and saved[0] >= 3, saved
  assert text.count("preempted: checkpoint at step") == 1  # process 0 says it, once
  assert not (workdir / "run.lock").exists()
