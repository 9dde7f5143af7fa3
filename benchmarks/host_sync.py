#!/usr/bin/env python3
r"""What a host sync per training step costs: the trainer's loop with metrics fetched every step
against every `log_every` steps, on a tiny model where the per-step overhead shows.

  python -m benchmarks.host_sync --steps 300 --log-every 1 50 --repeats 3

The loop keeps each step's metrics on the device and fetches them at log points, checkpoint
steps and the end (doran_jax.trainer); `--log-every 1` fetches after every step, as the loop did
before. Each timed fit runs the full loop (data, steps, metrics.jsonl, the final checkpoint) in a
fresh workdir after one warm-up fit that compiled the step; repeats alternate the settings, and
the JSON line per setting gives the median steps/s and its ratio to the first setting.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("USE_TORCH", "0")

from absl import logging  # noqa: E402

from benchmarks.matmul_probe import cpu_model  # noqa: E402

from configs import tiny  # noqa: E402
from doran_jax import config_lib, trainer  # noqa: E402
from doran_jax import run as run_lib  # noqa: E402


def _config(arg: str, steps: int, log_every: int, data_path: str):
  c = tiny.get_config(arg)
  with c.unlocked():
    c.num_steps, c.log_every, c.progress_bar = steps, log_every, False
    c.checkpoint.every = 10 * steps
    config_lib.set_path(c, "data.path", data_path)
  return c


def main(argv=None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config-arg", default="kind=text,method=dora",
                      help="configs/tiny.py's argument (default: %(default)s)")
  parser.add_argument("--data", default="../shared/data/text/sst2")
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--log-every", type=int, nargs="+", default=[1, 50])
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args(argv)
  logging.set_verbosity(logging.WARNING)
  runs = {n: run_lib.setup(_config(args.config_arg, args.steps, n, args.data))
          for n in args.log_every}
  times = {n: [] for n in args.log_every}
  with tempfile.TemporaryDirectory() as tmp:
    for n, run in runs.items():  # warm-up: compiles each run's step once
      trainer.fit(run.replace(num_steps=2), os.path.join(tmp, f"warm{n}"))
    for r in range(args.repeats):
      for n, run in runs.items():
        t = time.perf_counter()
        trainer.fit(run, os.path.join(tmp, f"r{r}_{n}"))
        times[n].append(time.perf_counter() - t)
  base = args.steps / statistics.median(times[args.log_every[0]])
  rows = []
  for n in args.log_every:
    rate = args.steps / statistics.median(times[n])
    rows.append({"log_every": n, "steps": args.steps, "steps_per_s": round(rate, 1),
                 "ratio_to_first": round(rate / base, 3), "seconds": [round(x, 3) for x in times[n]],
                 "config": args.config_arg, "cpu": cpu_model()})
    print(json.dumps(rows[-1]))
  return rows


if __name__ == "__main__":
  main()
