#!/usr/bin/env python3
r"""Sample efficiency of LoRA, DoRA and DoRAN on SST-2 with the real all-MiniLM-L6-v2.

Grid: 64, 256, 1024 and all 6,920 training sentences (`config.data.limit`, a random subset drawn
from the seed) × {lora, dora, doran} × seeds {0, 1, 2} = 36 runs from scratch, each with the
same compute: 80 steps at batch 16 (1,280 examples seen: 20 epochs of 64 sentences, 0.18 of
all). Otherwise the settings of scripts/study_stability.py: query and value kernels, rank 8,
alpha 16, AdamW (linear decay, 10% warm-up, clip 1.0), max_length 32, scored on a fixed
512-sentence subset of the SST-2 dev set; mean ± std over the three seeds.

Learning rate: `--lr tuned` (the default) gives each method the peak lr with the best mean
accuracy in docs/results/study_stability.csv (run that study first), so that a method is not
judged at an lr that suits another one; `--lr 1e-3` uses one lr for all methods and writes
files with an `_lr0.001` suffix.

  python scripts/study_sample_efficiency.py            # the study: about 15 min on 2 idle cores
  python scripts/study_sample_efficiency.py --lr 1e-3  # one shared lr instead
  python scripts/study_sample_efficiency.py --resume   # continue after an interruption
  python scripts/study_sample_efficiency.py --smoke    # 2 sizes x 3 methods x 1 seed, 6 steps

Writes into --out (docs/results; runs/study_smoke for --smoke): study_sample_efficiency.csv (one
row per run), study_sample_efficiency.png (accuracy vs training-set size) and
study_sample_efficiency.md (the table printed at the end, for docs/studies.md).

Cost: about 15 s per run plus 0.4 s per step on the idle 2-core machine (see
study_stability.py).
"""

from __future__ import annotations

import argparse
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from scripts import study_stability as common  # noqa: E402  (the shared study settings and grid runner)
from doran_jax import analysis, experiment  # noqa: E402

SIZES = "64,256,1024,all"


def tuned_lrs(stability_csv: str, methods) -> dict[str, float]:
  """Each method's peak lr with the best mean accuracy in the stability study's CSV."""
  if not os.path.exists(stability_csv):
    raise SystemExit(f"--lr tuned reads {stability_csv}, which does not exist: run "
                     "scripts/study_stability.py first, or pass a fixed --lr such as 1e-3.")
  agg = analysis.aggregate(analysis.read_csv(stability_csv), ("method", "lr"))
  best = {}
  for method in methods:
    found = [a for a in agg if a["method"] == method and a["failed"] < a["runs"]]
    if not found:
      raise SystemExit(f"{stability_csv} has no finished run of {method!r}: run the stability "
                       "study with that method, or pass a fixed --lr.")
    best[method] = float(max(found, key=lambda a: a["mean"])["lr"])
  return best


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  common.add_common_flags(p, steps=80, out_name="study_sample_efficiency")
  p.add_argument("--sizes", default=SIZES, help="training-set sizes; 'all' = no limit")
  p.add_argument("--lr", default="tuned",
                 help="'tuned' (each method's best lr in study_stability.csv) or one float")
  p.add_argument("--stability-csv", default=os.path.join(REPO, "docs", "results", "study_stability.csv"))
  args = p.parse_args(argv)
  if args.smoke:
    args.sizes, args.seeds, args.steps, args.eval_limit = "64,all", "0", 6, 64
  common.set_out(args)
  experiment.quiet_third_party_logs()
  methods = [m for m in args.methods.split(",") if m]
  sizes = [None if s == "all" else int(s) for s in args.sizes.split(",")]
  seeds = [int(s) for s in args.seeds.split(",")]
  if args.lr == "tuned":
    lrs, stem = tuned_lrs(args.stability_csv, methods), "study_sample_efficiency"
    lr_text = "Peak lr per method, the best in the stability study: " + ", ".join(
        f"{m} {lr:g}" for m, lr in lrs.items()) + "."
  else:
    lrs = {m: float(args.lr) for m in methods}
    stem = f"study_sample_efficiency_lr{float(args.lr):g}"
    lr_text = f"Peak lr {float(args.lr):g} for every method."
  points = [(m, lrs[m], s, n) for n in sizes for m in methods for s in seeds]
  rows = common.run_grid(points, args, os.path.join(args.out, stem + ".csv"))
  agg = analysis.aggregate(rows, ("limit", "method"))
  majority = rows[0]["majority_accuracy"]
  table = analysis.markdown_grid(agg, "limit", "method", row_label="training sentences",
                                 fmt=lambda n: f"{n:,}")
  text = (common.settings_line(args, "Sample efficiency on") + f" {lr_text} The same "
          f"{args.steps} steps for every size. Cells: dev accuracy mean ± std over seeds, then "
          f"how many runs ended at chance (majority class = {majority:.3f}).\n\n"
          f"{table}\n\n{common.wall_time_line(rows)}\n\n![]({stem}.png)\n")
  analysis.plot_study(agg, "limit", "method", os.path.join(args.out, stem + ".png"),
                      xlabel="training sentences (log scale)", ylabel="SST-2 dev accuracy (fraction)",
                      title=f"sample efficiency: {args.steps} steps, mean ± std over seeds {args.seeds}",
                      chance=majority)
  with open(os.path.join(args.out, stem + ".md"), "w") as f:
    f.write(text)
  print(text)


if __name__ == "__main__":
  main()
