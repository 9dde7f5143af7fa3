#!/usr/bin/env python3
r"""DynDoRA vs LoRA on CoLA with the real all-MiniLM-L6-v2, at the same final stored-parameter budget.

  python benchmarks/dyndora_cola.py                       # 2 epochs, max_length 32 -> docs/results/
  python benchmarks/dyndora_cola.py --out /tmp/x --steps 20 --methods dyndora   # timing smoke run

Both methods adapt the same kernels (configs/cola.py: query, key, value and every dense). LoRA
trains rank 8 everywhere; DynDoRA trains r0 = ceil(1.5·8) = 12 components per kernel and prunes
them to 8 live per kernel on average (one global budget, so layers end up with different ranks).
Writes dyndora_cola.csv, dyndora_cola.md (the table plus DynDoRA's per-kernel rank table) and
dyndora_cola_ranks.png (the rank allocation) into --out. Runs go to runs/dyndora_cola/<method>
and start fresh each time.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
from configs import cola  # noqa: E402
from doran_jax import analysis, experiment  # noqa: E402
from doran_jax import run as run_lib  # noqa: E402
from doran_jax.adapters import dynrank  # noqa: E402
from doran_jax.adapters import count_params  # noqa: E402

FIELDS = ("method", "rank", "stored_rank", "mcc", "accuracy", "adapter_params_trained",
          "adapter_params_stored", "head_params", "live_components", "steps", "train_minutes",
          "total_minutes")


def run_method(method: str, args) -> tuple[dict, str]:
  """Trains one method from scratch; returns its table row and (dyndora) the rank report."""
  config = cola.get_config(f"method={method},rank={args.rank}")
  workdir = os.path.join(args.runs, method)
  shutil.rmtree(workdir, ignore_errors=True)  # a leftover checkpoint would resume, not retrain
  with config.unlocked():
    config.workdir = workdir
    config.data.path = args.data
    config.data.max_length = args.max_length
    config.num_epochs = args.epochs
    config.num_steps = args.steps
    config.baselines = ()
    config.checkpoint.every = 10**9  # one checkpoint at the end is enough here
    config.log_every = 25
    config.seed = args.seed
  t0 = time.time()
  run = run_lib.setup(config)
  results = experiment.train(config, workdir, run=run)
  adapters = jax.device_get(results["state"].trainable["adapters"])
  trained = count_params(adapters)
  report = ""
  if method == "dyndora":
    stored, live = dynrank.count_live_params(adapters), sum(dynrank.live_ranks(adapters).values())
    report = analysis.rank_report(adapters, os.path.join(args.out, "dyndora_cola_ranks.png"))
    report = "\n".join(l for l in report.splitlines() if not l.startswith("plot:"))  # no abs path
  else:
    stored, live = trained, run.adapter_cfg.stored_rank * len(adapters_targets(adapters))
  row = {"method": method, "rank": args.rank, "stored_rank": run.adapter_cfg.stored_rank,
         "mcc": results["eval"]["mcc"], "accuracy": results["eval"]["accuracy"],
         "adapter_params_trained": trained, "adapter_params_stored": stored,
         "head_params": count_params(results["state"].trainable["params"]), "live_components": live,
         "steps": results["steps"], "train_minutes": results["train_minutes"],
         "total_minutes": (time.time() - t0) / 60}
  return row, report


def adapters_targets(adapters) -> list[str]:
  from doran_jax.targets import flatten
  return [p for p in flatten(adapters["targets"]) if p.endswith("/lora_a")]


def markdown(rows: list[dict], args) -> str:
  lines = [f"CoLA dev (n = 516), all-MiniLM-L6-v2, {args.epochs:g} epochs"
           + (f" ({args.steps} steps)" if args.steps else "")
           + f", batch 32, max_length {args.max_length}, AdamW lr 1e-3, seed {args.seed}, "
           "targets query/key/value/dense, alpha 16, 2 CPU cores.", "",
           "| method | rank (stored r0) | MCC | accuracy | adapter params trained | "
           "adapter params stored after training | live components | steps | train min |",
           "|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['method']} | {r['rank']} ({r['stored_rank']}) | {r['mcc']:.4f} | "
                 f"{r['accuracy']:.4f} | {r['adapter_params_trained']:,} | "
                 f"{r['adapter_params_stored']:,} | {r['live_components']} | {r['steps']} | "
                 f"{r['train_minutes']:.1f} |")
  return "\n".join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", default=os.path.join(REPO, "docs", "results"), help="folder for the table and PNG")
  p.add_argument("--runs", default=os.path.join(REPO, "runs", "dyndora_cola"), help="training workdirs")
  p.add_argument("--data", default=os.path.join(os.path.dirname(REPO), "shared", "data", "text", "cola"))
  p.add_argument("--methods", default="dyndora,lora")
  p.add_argument("--rank", type=int, default=8)
  p.add_argument("--epochs", type=float, default=2.0)
  p.add_argument("--steps", type=int, default=0, help="overrides --epochs when > 0")
  p.add_argument("--max-length", type=int, default=32,
                 help="32 truncates 5 of 8,551 CoLA training sentences (longest: 46 tokens)")
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)
  methods = [m.strip() for m in args.methods.split(",") if m.strip()]
  unknown = set(methods) - {"dyndora", "lora", "dora", "doran"}
  if unknown:
    raise ValueError(f"--methods {sorted(unknown)} unknown; choose from dyndora, lora, dora, doran.")
  if not os.path.isdir(args.data):
    raise ValueError(f"CoLA folder {args.data!r} not found; pass --data (sentence<TAB>label TSVs).")
  os.makedirs(args.out, exist_ok=True)
  experiment.quiet_third_party_logs()
  rows, reports = [], []
  for method in methods:
    row, report = run_method(method, args)
    rows.append(row)
    print(json.dumps(row), flush=True)
    if report:
      reports.append(report)
  with open(os.path.join(args.out, "dyndora_cola.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=FIELDS)
    writer.writeheader()
    writer.writerows(rows)
  text = markdown(rows, args)
  if reports:
    text += "\n\nDynDoRA live ranks per adapted kernel (![](dyndora_cola_ranks.png)):\n\n" + reports[0]
  with open(os.path.join(args.out, "dyndora_cola.md"), "w") as f:
    f.write(text + "\n")
  print(text)


if __name__ == "__main__":
  main()
