#!/usr/bin/env python3
r"""DoRAN taken apart: which of τ, the noise on τ and the shared generator changes what, on SST-2 and CoLA.

Variants (each at its own best lr from the grid, N seeds, real all-MiniLM-L6-v2, the task's
config file otherwise unchanged):
  lora                  LoRA
  dora                  DoRA
  dora_tau              DoRAN's τ on static A, B (adapter.generator=False, noise_std=0)
  dora_tau_noise        ... with the log-normal noise on τ (noise_std=0.1)
  generator_fixed_tau   the shared generator, τ held at tau_init (learn_tau=False, noise_std=0)
  doran_model           DoRAN as shipped (generator share='model', learnable τ, noise 0.1)
  doran_block           DoRAN with share='block' (the paper's figure: q and v of a block share)
  dora_tau0.5_noise     dora_tau_noise with tau_init 0.5 instead of 0.01: a τ large enough to
                        change the denominator (MiniLM's column norms are 0.5-8)
Scores: eval accuracy (SST-2) / MCC (CoLA) mean ± std over seeds; stability as the paper frames
it: seed-to-seed spread (max − min), loss spikes (steps whose loss exceeds 2× the median of the
20 steps before; analysis.SPIKE_FACTOR / SPIKE_WINDOW), and the gradient-norm variance over
training (global norm before clipping), both averaged over seeds.

  python scripts/study_doran_ablation.py                    # both tasks at the defaults below
  python scripts/study_doran_ablation.py --tasks sst2 --steps 200 --eval-limit 0 --tune-seeds 0
                                  # docs/studies.md's SST-2 table (40 runs, ~100 s each idle)
  python scripts/study_doran_ablation.py --tasks sst2 --targets attention    # q+v only: cheaper
  python scripts/study_doran_ablation.py --tasks cola --variants lora,dora_tau --lrs 1e-3 --seeds 0
  python scripts/study_doran_ablation.py --smoke --out /tmp/abl   # 2 variants, 3 steps, 32 examples

Defaults: 72 runs per task (8 variants × lrs 3e-4, 1e-3, 3e-3 × seeds 0, 1, 2) of 60 steps at
batch 16, max_length 32, dev subset 512, the config's targets. Cost measured 2026-12-02 on the
2-core AMD EPYC while other jobs ran (load average ~7-9): one 40-step DoRAN point on SST-2 took
97 s (0.84 s per step + start-up and compilation, which the on-disk compile cache shares
between seeds); so a task takes roughly 1-1.5 h at the defaults, both tasks 2-3 h (an estimate).
Use --tasks, --variants, --seeds, --targets attention or fewer --steps to fit a budget, and say so.

Writes <out>/study_doran_ablation_<task>.{csv,md,png} (one row per run; the table; mean ± std per
variant at its best lr) and the combined study_doran_ablation.{csv,md} over every task run into
<out> so far, so the tasks may run as separate commands.
"""

from __future__ import annotations

import argparse
import os
import pathlib

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from doran_jax import analysis, experiment  # noqa: E402
from scripts import grid  # noqa: E402

V = grid.Variant
VARIANTS = {
    "lora": V("lora", "lora"),
    "dora": V("dora", "dora"),
    "dora_tau": V("dora_tau", "doran", {"adapter.generator": False, "adapter.noise_std": 0.0}),
    "dora_tau_noise": V("dora_tau_noise", "doran", {"adapter.generator": False, "adapter.noise_std": 0.1}),
    "generator_fixed_tau": V("generator_fixed_tau", "doran",
                             {"adapter.learn_tau": False, "adapter.noise_std": 0.0}),
    "doran_model": V("doran_model", "doran", {"adapter.share": "model"}),
    "doran_block": V("doran_block", "doran", {"adapter.share": "block"}),
    # τ = 0.01 is about 1% of MiniLM's column norms (0.5-8), so the variants above barely move
    # DoRA's denominator; τ0 = 0.5 is a third to a half of them: the gain m / (n + τ) then sits
    # between DoRA's (τ -> 0) and LoRA's (τ -> ∞, gain -> 1), and the noise on it is ~3%.
    "dora_tau0.5_noise": V("dora_tau0.5_noise", "doran", {"adapter.generator": False,
                                                          "adapter.tau_init": 0.5,
                                                          "adapter.noise_std": 0.1}),
}
TASKS = {"sst2": ("sst2.py", "accuracy"), "cola": ("cola.py", "mcc")}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  grid.add_flags(p, config="", lrs="3e-4,1e-3,3e-3", seeds="0,1,2", steps=60, limit=0,
                 eval_limit=512, name="study_doran_ablation")
  p.add_argument("--tasks", default="sst2,cola")
  p.add_argument("--targets", default="", help="adapter targets for every variant (a regex or a "
                 "family preset: 'attention' = query+value); default: the task config's")
  p.add_argument("--variants", default=",".join(VARIANTS))
  p.add_argument("--smoke", action="store_true", help="2 variants x 1 lr x 1 seed, 3 steps, 32 examples")
  args = p.parse_args(argv)
  if args.smoke:
    args.variants, args.lrs, args.seeds = "dora_tau,generator_fixed_tau", "1e-3", "0"
    args.steps, args.limit, args.eval_limit, args.max_length = 3, 32, 32, 16
  args.batch = args.batch or 16
  args.max_length = args.max_length or 32
  grid.finish_flags(args)
  names = grid.parse_list(args.variants, str)
  unknown = [n for n in names if n not in VARIANTS]
  if unknown:
    raise ValueError(f"--variants {unknown} unknown; choose from {', '.join(VARIANTS)}.")
  tasks = grid.parse_list(args.tasks, str)
  if any(t not in TASKS for t in tasks):
    raise ValueError(f"--tasks {tasks}: choose from {', '.join(TASKS)}.")
  experiment.quiet_third_party_logs()
  variants = [VARIANTS[n] for n in names]
  if args.targets:
    variants = [V(v.name, v.method, {**v.overrides, "adapter.targets": args.targets}) for v in variants]
  base_runs, csv_all = args.runs, []
  for task in tasks:
    config_file, metric = TASKS[task]
    args.config = os.path.join(grid.REPO, "configs", config_file)
    args.runs = os.path.join(base_runs, task)
    rows = grid.run_grid(variants, args, os.path.join(args.out, f"{args.name}_{task}.csv"), metric)
    best = grid.best_by_variant(rows, metric, names, tune_seeds=grid.tune_seeds(args))
    chance = rows[0]["majority_accuracy"] if metric == "accuracy" else 0.0
    png = f"{args.name}_{task}.png"
    grid.plot_best(best, os.path.join(args.out, png), ylabel=f"{task} eval {metric}",
                   title=f"DoRAN ablation, {task}: mean ± std over seeds {args.seeds} at each "
                         "variant's best lr", chance=chance)
    where = f" Targets: {args.targets}." if args.targets else ""
    with open(os.path.join(args.out, f"{args.name}_{task}.md"), "w") as f:
      f.write(f"### {task} (eval {metric})\n\n{grid.settings_line(args, config_file)}{where}\n\n"
              f"{grid.markdown_best(best, metric)}\n\n![]({png})\n")
  # The combined files hold every task run into --out so far, each with its own settings (the
  # tasks may be run by separate commands).
  sections = []
  for task in TASKS:
    stem = os.path.join(args.out, f"{args.name}_{task}")
    if os.path.exists(stem + ".md") and os.path.exists(stem + ".csv"):
      sections.append(pathlib.Path(stem + ".md").read_text())
      csv_all += [{**r, "task": task} for r in analysis.read_csv(stem + ".csv")]
  analysis.write_csv(csv_all, os.path.join(args.out, f"{args.name}.csv"), ("task",) + grid.FIELDS)
  text = (f"DoRAN ablation, all-MiniLM-L6-v2. Loss spike: a step whose loss exceeds "
          f"{analysis.SPIKE_FACTOR:g}× the median of the {analysis.SPIKE_WINDOW} steps before it. "
          "The best lr is chosen on the eval split it is scored on.\n\n" + "\n".join(sections))
  with open(os.path.join(args.out, f"{args.name}.md"), "w") as f:
    f.write(text)
  print(text)


if __name__ == "__main__":
  main()
