#!/usr/bin/env python3
r"""Times the LLM job's own training step with the LM head at the target positions only
(data.target_logits_only=True, the default) and over every position (False), side by side.

The job is configs/smollm2.py unless --config names another: the real SmolLM2-135M-Instruct,
packed commonsense SFT rows (4 x 256 tokens, the loss on the answers), DoRA r16 on q, k, v, up,
down. Each setting runs in its own process (for its peak RSS), alternating, --rounds times;
each prints one JSON line (median and min step seconds after --warmup steps, the LM head's
positions per row, peak RSS, the loss of every timed step).

  python benchmarks/sft_step.py                                   # ~6 min on 2 cores
  python benchmarks/sft_step.py --config configs/tiny.py --arg kind=causal --steps 4 --rounds 1
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("USE_TORCH", "0")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(path: str, arg: str, target_logits_only: bool):
  from doran_jax import config_lib
  module = importlib.import_module(os.path.splitext(os.path.relpath(path, REPO))[0]
                                   .replace(os.sep, "."))
  config = module.get_config(arg or None)
  with config.unlocked():
    config.data.target_logits_only = target_logits_only
  config_lib.validate(config)   # data paths are the config's, relative to the repo (children's cwd)
  return config


def child(args) -> dict:
  import jax
  from doran_jax import run as run_lib
  from doran_jax import sharding
  on = args.child == "on"
  config = _config(args.config, args.arg, on)
  run = run_lib.setup(config)
  state = run.state
  times, losses, positions = [], [], None
  for step in range(args.warmup + args.steps):
    local = run.train_data.batch(step, config.batch_size, seed=config.seed)
    if step == 0:
      positions = local.get("logit_positions")
    batch = sharding.global_batch(local, run.mesh)
    t0 = time.perf_counter()
    state, metrics = run.train_step(state, run.frozen, batch)
    jax.block_until_ready(metrics)
    if step >= args.warmup:
      times.append(time.perf_counter() - t0)
      losses.append(float(metrics["loss"]))
  return {"target_logits_only": on, "config": f"{args.config}:{args.arg}",
          "batch": int(config.batch_size), "max_length": int(config.data.max_length),
          "lm_head_positions_per_row": (int(positions.shape[1]) if positions is not None
                                        else int(config.data.max_length)),
          "median_step_s": statistics.median(times), "min_step_s": min(times),
          "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
          "losses": losses}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default=os.path.join(REPO, "configs", "smollm2.py"))
  p.add_argument("--arg", default="", help="the config's argument string (e.g. kind=causal)")
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--rounds", type=int, default=2)
  p.add_argument("--child", choices=["on", "off"], default=None, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.child:
    print(json.dumps(child(args)), flush=True)
    return 0
  results = {"on": [], "off": []}
  for _ in range(args.rounds):
    for which in ("on", "off"):
      cmd = [sys.executable, os.path.abspath(__file__), "--child", which, "--config",
             os.path.abspath(args.config),
             "--arg", args.arg, "--steps", str(args.steps), "--warmup", str(args.warmup)]
      out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=REPO,
                           env={**os.environ, "PYTHONPATH": REPO})
      row = json.loads(out.stdout.strip().splitlines()[-1])
      results[which].append(row)
      print(json.dumps(row), flush=True)
  on = statistics.median(r["median_step_s"] for r in results["on"])
  off = statistics.median(r["median_step_s"] for r in results["off"])
  print(f"median step: target positions only {on:.3f} s, every position {off:.3f} s "
        f"({on / off:.2f}x); peak RSS {max(r['peak_rss_mb'] for r in results['on']):.0f} vs "
        f"{max(r['peak_rss_mb'] for r in results['off']):.0f} MB", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
