#!/usr/bin/env python3
r"""Learning-rate sweep: methods × lr grid × seeds on one config file, to fill its per-method LR table.

Every point trains from scratch with the config file's settings for that method (DynDoRA with
its official recipe), at the grid's lr; the best lr per method is the one with the highest
mean of --metric over the seeds on the eval split. Writes <out>/<name>.csv (one row per run)
and <out>/<name>.md (the best-lr table, the full grid and the LR line to paste into the config).

  python scripts/lr_sweep.py --config configs/sst2.py --methods lora,dora,doran,dyndora,frozen \
      --lrs 1e-4,3e-4,1e-3,3e-3,1e-2 --seeds 0,1,2               # the full grid (hours on 2 cores)
  python scripts/lr_sweep.py --config configs/cola.py --metric mcc --steps 400 --limit 4000
  python scripts/lr_sweep.py --smoke --out /tmp/sweep             # 2 methods × 2 lrs, 3 steps

--steps/--limit/--eval-limit shrink the runs (then say so next to any number taken from them).
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from doran_jax import analysis, experiment  # noqa: E402
from scripts import grid  # noqa: E402


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  grid.add_flags(p, config=os.path.join(grid.REPO, "configs", "sst2.py"), lrs="1e-4,3e-4,1e-3,3e-3",
                 seeds="0,1,2", steps=0, limit=0, eval_limit=0, name="")
  p.add_argument("--methods", default="lora,dora,doran,dyndora,frozen")
  p.add_argument("--metric", default="accuracy", choices=("accuracy", "mcc", "macro_f1"))
  p.add_argument("--smoke", action="store_true", help="2 methods x 2 lrs x 1 seed, 3 steps, 32 examples")
  args = p.parse_args(argv)
  stem = os.path.splitext(os.path.basename(args.config))[0]
  if args.smoke:
    args.methods, args.lrs, args.seeds = "lora,frozen", "1e-3,1e-2", "0"
    args.steps, args.limit, args.eval_limit, args.max_length = 3, 32, 32, 16
  args.name = args.name or f"lr_sweep_{stem}"
  grid.finish_flags(args)
  experiment.quiet_third_party_logs()
  methods = grid.parse_list(args.methods, str)
  variants = [grid.Variant(m, m) for m in methods]
  csv_path = os.path.join(args.out, f"{args.name}.csv")
  rows = grid.run_grid(variants, args, csv_path, args.metric)
  best = grid.best_by_variant(rows, args.metric, methods, tune_seeds=grid.tune_seeds(args))
  agg = analysis.aggregate(rows, ("lr", "variant"), value=args.metric)
  table = analysis.markdown_grid(agg, "lr", "variant", row_label="learning rate")
  lr_line = "LR = {" + ", ".join(f'"{b["variant"]}": {b["best_lr"]:g}' for b in best) + "}"
  text = (f"Learning-rate sweep, {grid.settings_line(args, stem)} Metric: eval {args.metric}.\n\n"
          f"Best lr per method (mean ± std over seeds at that lr):\n\n"
          f"{grid.markdown_best(best, args.metric)}\n\nFull grid ({args.metric}, mean ± std):\n\n"
          f"{table}\n\nFor {args.config}:\n\n    {lr_line}\n")
  with open(os.path.join(args.out, f"{args.name}.md"), "w") as f:
    f.write(text)
  print(text)


if __name__ == "__main__":
  main()
