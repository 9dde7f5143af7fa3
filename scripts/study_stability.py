#!/usr/bin/env python3
r"""Learning-rate stability of LoRA, DoRA and DoRAN on SST-2 with the real all-MiniLM-L6-v2.

Grid: learning rates 1e-4 … 3e-2 (6 points, half-decade steps) × {lora, dora, doran} × seeds
{0, 1, 2} = 54 runs from scratch. Each run: query and value kernels, rank 8, alpha 16, AdamW
with the library defaults (linear decay, 10% warm-up, clip_norm 1.0), 60 steps at batch 16,
max_length 32, scored on a fixed 512-sentence subset of the SST-2 dev set. A run has *failed*
when it stops on a NaN/Inf loss (trainer.NonFiniteLossError) or finishes at chance (dev accuracy
below the majority class + 0.05: at a low lr the run has not left chance in 60 steps, at a high
lr it has collapsed to one class). Mean ± std is over the runs that finished. Seeds change the
adapter init, data order, dropout and DoRAN noise (the task head starts from the same init).

  python scripts/study_stability.py                 # the study: about 35 min on 2 idle cores
  python scripts/study_stability.py --resume        # continue after an interruption
  python scripts/study_stability.py --smoke         # 2 lrs x 3 methods x 1 seed, 6 steps

Writes into --out (docs/results; runs/study_smoke for --smoke): study_stability.csv (one row per
run), study_stability.png (accuracy vs learning rate), study_stability.md (the table printed at
the end, for docs/studies.md).

Cost on the idle 2-core machine: about 15 s per run (tokenising, compiling, evaluating 512
sentences; MiniLM is loaded once and compiled steps are cached on disk across seeds, in
<runs>/jax_cache) plus about 0.4 s per step at batch 16 and max_length 32.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from configs import sst2  # noqa: E402
from doran_jax import analysis, experiment, trainer  # noqa: E402
from doran_jax import run as run_lib  # noqa: E402

SST2 = os.path.join(os.path.dirname(REPO), "shared", "data", "text", "sst2")
LRS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2)
METHODS = ("lora", "dora", "doran")
FIELDS = ("method", "lr", "seed", "requested_limit", "limit", "status", "accuracy", "macro_f1", "final_loss",
          "majority_accuracy", "steps", "train_examples", "eval_examples", "wall_s", "cpu_s",
          "error")


def study_config(method: str, *, lr: float, seed: int, args, limit=None):
  """configs/sst2.py with the study's settings (shared with study_sample_efficiency.py)."""
  config = sst2.get_config(f"method={method}")
  with config.unlocked():
    config.adapter.targets = r".*/(query|value)/kernel"
    config.adapter.rank = args.rank
    config.adapter.alpha = 2.0 * args.rank
    config.seed = seed
    config.optim.lr = lr
    config.num_steps = args.steps
    config.batch_size = args.batch
    config.optim.warmup_steps = max(args.steps // 10, 1)
    config.data.path = args.data
    config.data.max_length = args.max_length
    config.data.eval_limit = args.eval_limit
    config.data.limit = limit
    config.checkpoint.every = 10**9   # the final checkpoint only
    config.log_every = 10**9          # keep the console to one line per run
    config.baselines = ()
  return config


def add_common_flags(p: argparse.ArgumentParser, *, steps: int, out_name: str) -> None:
  p.add_argument("--out", default=None, help="default docs/results (runs/study_smoke with --smoke)")
  p.add_argument("--runs", default=os.path.join(REPO, "runs", out_name), help="scratch workdirs")
  p.add_argument("--data", default=SST2, help="SST-2 folder (label<TAB>sentence TSVs)")
  p.add_argument("--methods", default=",".join(METHODS))
  p.add_argument("--seeds", default="0,1,2")
  p.add_argument("--steps", type=int, default=steps)
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--rank", type=int, default=8)
  p.add_argument("--max-length", type=int, default=32,
                 help="32 truncates 20%% of SST-2 sentences (90%% are <= 38 tokens)")
  p.add_argument("--eval-limit", type=int, default=512, help="fixed random subset of the dev set")
  p.add_argument("--chance-margin", type=float, default=0.05)
  p.add_argument("--resume", action="store_true", help="skip the runs already in the CSV")
  p.add_argument("--smoke", action="store_true")


def set_out(args) -> None:
  """--out defaults to docs/results, and to runs/study_smoke for a smoke run."""
  if args.out is None:
    args.out = os.path.join(REPO, *(("runs", "study_smoke") if args.smoke else ("docs", "results")))
  os.makedirs(args.out, exist_ok=True)


def _limit_key(limit) -> str:
  return "all" if limit is None else str(int(limit))


class ModelCache:
  """Loads the tokenizer and MiniLM once; hands each run its own device copy of the weights.

  trainer.setup consumes a backbone (its params move into the run's state), so every run gets
  a fresh Backbone over the same host weights. Seeds do not change the task head's init.
  """

  def __init__(self, config, num_labels: int = 2):
    self.tokenizer = run_lib.load_tokenizer(config)
    self.backbone = run_lib.load_model(config, num_labels=num_labels)
    self.host_params = jax.device_get(self.backbone.params)

  def fresh(self):
    return dataclasses.replace(self.backbone,
                               params=jax.tree_util.tree_map(jnp.array, self.host_params))


def enable_compile_cache(path: str) -> None:
  # Runs that differ only in seed (and, per lr, in nothing else) compile the same step: the
  # persistent cache turns the second and third compile into a disk read.
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def run_grid(points, args, csv_path: str) -> list[dict]:
  """Runs every (method, lr, seed, limit) point not already done; the CSV grows run by run."""
  rows = analysis.read_csv(csv_path) if args.resume and os.path.exists(csv_path) else []
  enable_compile_cache(os.path.join(args.runs, "jax_cache"))
  cache = None
  done = {(r["method"], float(r["lr"]), int(r["seed"]), str(r["requested_limit"])) for r in rows}
  t0 = time.time()
  todo = [p for p in points if (p[0], p[1], p[2], _limit_key(p[3])) not in done]
  for i, (method, lr, seed, limit) in enumerate(todo):
    config = study_config(method, lr=lr, seed=seed, args=args, limit=limit)
    cache = cache or ModelCache(config)
    row = analysis.train_and_score(config, os.path.join(args.runs, "point"),
                                   chance_margin=args.chance_margin, backbone=cache.fresh(),
                                   tokenizer=cache.tokenizer)
    row["requested_limit"] = _limit_key(limit)
    rows.append(row)
    analysis.write_csv(rows, csv_path, FIELDS)
    eta = (time.time() - t0) / (i + 1) * (len(todo) - i - 1)
    print(f"[{i + 1}/{len(todo)}] {method} lr {lr:g} seed {seed} limit {row['limit']}: "
          f"{row['status']} accuracy {row['accuracy']:.4f} ({row['wall_s']:.0f} s, "
          f"eta {eta / 60:.0f} min)", flush=True)
  return rows


def wall_time_line(rows) -> str:
  """The study's cost from its CSV, so a --resume'd study reports all of its runs."""
  total = sum(float(r["wall_s"]) for r in rows)
  return f"{len(rows)} runs, {total / 60:.1f} min of run wall time ({total / len(rows):.0f} s per run)."


def settings_line(args, what: str) -> str:
  return (f"{what} SST-2 (../shared/data), all-MiniLM-L6-v2, query+value rank {args.rank} "
          f"(alpha {2 * args.rank}), {args.steps} steps at batch {args.batch}, max_length "
          f"{args.max_length}, AdamW (linear decay, 10% warm-up, clip 1.0), dev subset of "
          f"{args.eval_limit}, seeds {args.seeds}.")


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  add_common_flags(p, steps=60, out_name="study_stability")
  p.add_argument("--lrs", default=",".join(f"{x:g}" for x in LRS))
  args = p.parse_args(argv)
  if args.smoke:
    args.lrs, args.seeds, args.steps, args.eval_limit = "1e-3,3e-2", "0", 6, 64
  set_out(args)
  experiment.quiet_third_party_logs()
  methods = [m for m in args.methods.split(",") if m]
  lrs = [float(x) for x in args.lrs.split(",")]
  seeds = [int(s) for s in args.seeds.split(",")]
  points = [(m, lr, s, None) for lr in lrs for m in methods for s in seeds]
  rows = run_grid(points, args, os.path.join(args.out, "study_stability.csv"))
  agg = analysis.aggregate(rows, ("lr", "method"))
  majority = rows[0]["majority_accuracy"]
  table = analysis.markdown_grid(agg, "lr", "method", row_label="learning rate")
  text = (settings_line(args, "Learning-rate stability on") + " Cells: dev accuracy mean ± std "
          "over seeds, then how many runs ended at chance (accuracy below the majority class "
          f"{majority:.3f} + {args.chance_margin:g}) and how many stopped on a NaN loss."
          f"\n\n{table}\n\n{wall_time_line(rows)}\n\n![](study_stability.png)\n")
  analysis.plot_study(agg, "lr", "method", os.path.join(args.out, "study_stability.png"),
                      xlabel="peak learning rate (AdamW)", ylabel="SST-2 dev accuracy (fraction)",
                      title=f"stability: {args.steps} steps, mean ± std over seeds {args.seeds}",
                      chance=majority)
  with open(os.path.join(args.out, "study_stability.md"), "w") as f:
    f.write(text)
  print(text)


if __name__ == "__main__":
  main()
