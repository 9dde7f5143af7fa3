"""Runs tiny training jobs on simulated CPU devices and prints one JSON line (used by test_sharding).

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/multidevice_worker.py \
      --methods lora,dora --meshes 1x1x1,2x2x2 --data ../shared/data/text/sst2 --steps 3
"""

import argparse
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from configs import tiny  # noqa: E402
from doran_jax import experiment  # noqa: E402
from doran_jax import run as run_lib  # noqa: E402
from doran_jax.targets import flatten  # noqa: E402


def config_for(method, mesh, data, workdir, steps):
  c = tiny.get_config(f"kind=text,method={method}")
  with c.unlocked():
    c.data.path = data
    c.workdir = workdir
    c.num_steps = steps
    c.mesh = f"data:{mesh[0]},fsdp:{mesh[1]},model:{mesh[2]}"
    c.sharding_rules = "tensor_parallel"
    c.checkpoint.every = 1000
  return c


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--methods", default="lora,dora,doran")
  p.add_argument("--meshes", default="1x1x1")
  p.add_argument("--data", required=True)
  p.add_argument("--workdir", required=True)
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--max-steps", type=int, default=None)
  args = p.parse_args()
  out = {"devices": jax.device_count()}
  for method in args.methods.split(","):
    for mesh_name in args.meshes.split(","):
      mesh = tuple(int(x) for x in mesh_name.split("x"))
      workdir = os.path.join(args.workdir, f"{method}_{mesh_name}")
      c = config_for(method, mesh, args.data, workdir, args.steps)
      run = run_lib.setup(c)
      res = experiment.train(c, run=run, max_steps=args.max_steps)
      adapters = flatten(jax.device_get(res["state"].trainable["adapters"])) if res["status"] == "done" else {}
      # the sharding of one adapted kernel's A, to show the mesh was really used
      specs = {k: str(v.sharding.spec) for k, v in flatten(run.frozen).items() if k.endswith("query/kernel")}
      out[f"{method}_{mesh_name}"] = {
          "losses": [h["loss"] for h in res["history"]], "status": res["status"],
          "adapters": {k: np.asarray(v).ravel()[:64].tolist() for k, v in adapters.items()},
          "kernel_specs": specs}
  print("RESULT " + json.dumps(out))


if __name__ == "__main__":
  main()
