#!/usr/bin/env python3
r"""DynDoRA vs LoRA on CoLA with the real all-MiniLM-L6-v2, at the same stored-parameter budget.

Both adapt the same kernels (configs/cola.py: every linear layer of each block). LoRA trains
rank r everywhere; DynDoRA trains r0 = ceil(1.5·r) components per kernel and prunes them to r
live per kernel on average (one global budget, so layers end with different ranks), with the
official recipe (doran_jax/adapters/dyndora.py RECIPE: kaiming-uniform A and B, alpha 8,
dropout 0.1, weight decay 0.01, 6% warm-up, clip 1.0). Each variant runs at every lr of the
grid for every seed and is reported at its best lr (mean dev MCC over seeds): mean ± std MCC,
the stored parameters after training, and DynDoRA's per-layer rank allocation (seed 0 at its
best lr).

Variants (--variants): lora, dyndora (the official recipe) and, to measure what the recipe
changed, dyndora_gaussian (our earlier init: A ~ U(±1/sqrt(in)), B ~ N(0, 0.02²)) and
dyndora_ours (the earlier setup: that init, alpha 16, no dropout, no weight decay, cola.py's
warm-up steps).

  python scripts/study_dyndora_cola.py                           # docs/studies.md's table (~1 h)
  python scripts/study_dyndora_cola.py --lrs 3e-4,1e-3,3e-3      # a 3-point grid (~1.5 h)
  python scripts/study_dyndora_cola.py --variants lora,dyndora,dyndora_gaussian,dyndora_ours
  python scripts/study_dyndora_cola.py --epochs 15               # the official length (hours)
  python scripts/study_dyndora_cola.py --smoke --out /tmp/dyn    # 3 steps, 32 examples

Defaults: 12 runs (2 variants × lrs 1e-3, 3e-3 × seeds 0, 1, 2) of 2 epochs at batch 16 (the
official batch; 1,069 steps over CoLA's 8,551 sentences), max_length 32, the full dev set.
Measured 2026-12-02 on the 2-core AMD EPYC with nothing else running: ~300 s per run, so ~1 h.
Shorter runs say nothing: at 300 steps (0.56 epoch) LoRA at lrs 3e-4 and 1e-3 still predicted
the majority class for every seed (dev MCC 0.000), with the pooler still frozen then; lr 3e-4
was left out of the 2-epoch grid to fit the hour.

Writes <out>/study_dyndora_cola.csv, .md, .png (MCC per variant) and
study_dyndora_cola_ranks.png (the rank allocation).
"""

from __future__ import annotations

import argparse
import os
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402

from doran_jax import analysis, experiment  # noqa: E402
from doran_jax.adapters import count_params, dynrank  # noqa: E402
from scripts import grid  # noqa: E402

V = grid.Variant
OURS = {"adapter.init": "gaussian", "adapter.alpha": 16.0, "adapter.dropout": 0.0,
        "adapter.mode": "merged", "optim.weight_decay": 0.0, "optim.warmup_ratio": None}
VARIANTS = {
    "lora": V("lora", "lora"),
    "dyndora": V("dyndora", "dyndora"),
    "dyndora_gaussian": V("dyndora_gaussian", "dyndora", {"adapter.init": "gaussian"}),
    "dyndora_ours": V("dyndora_ours", "dyndora", OURS),
}


def rank_dir(args) -> str:
  return os.path.join(args.runs, "ranks")


def rank_stem(ranks: str, variant: str, lr: float, seed: int) -> str:
  """Path stem (no extension) of one run's rank table and plot in the scratch folder."""
  return os.path.join(ranks, f"{variant}_lr{lr:g}_seed{seed}")


def rank_source(best: dict, rows: list[dict], ranks: str):
  """(seed, file stem) of the rank report to publish for a variant at its best lr: the lowest
  seed of the CSV whose report is still in the scratch folder (a --resume that adds seeds 3, 4
  must not pass off seed 3 as the --seeds' first), or None (not pruned, or no report left)."""
  seeds = sorted({int(r["seed"]) for r in rows
                  if r["variant"] == best["variant"] and float(r["lr"]) == best["best_lr"]})
  for seed in seeds:
    stem = rank_stem(ranks, best["variant"], best["best_lr"], seed)
    if os.path.exists(stem + ".png") and os.path.exists(stem + ".md"):
      if seed != seeds[0]:
        print(f"rank report: seed {seeds[0]}'s is no longer in {ranks}; publishing seed {seed}'s")
      return seed, stem
  return None


def inspect(args):
  """Stored parameters of every run; DynDoRA's live ranks table and plot kept per (lr, seed)."""
  def hook(variant, lr, seed, run, results):
    adapters = jax.device_get(results["state"].trainable["adapters"])
    if "live_ranks" not in results:  # no rank allocation: every stored component is live
      return {"adapter_params_stored": count_params(adapters), "mean_rank": run.adapter_cfg.rank}
    stem = rank_stem(rank_dir(args), variant.name, lr, seed)
    report = analysis.rank_report(adapters, stem + ".png")
    with open(stem + ".md", "w") as f:
      f.write("\n".join(l for l in report.splitlines() if not l.startswith("plot:")) + "\n")
    ranks = dynrank.live_ranks(adapters)
    return {"adapter_params_stored": dynrank.count_live_params(adapters),
            "mean_rank": sum(ranks.values()) / len(ranks)}
  return hook


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  grid.add_flags(p, config=os.path.join(grid.REPO, "configs", "cola.py"),
                 lrs="1e-3,3e-3", seeds="0,1,2", steps=0, limit=0, eval_limit=0,
                 name="study_dyndora_cola")
  p.add_argument("--variants", default="lora,dyndora")
  p.add_argument("--rank", type=int, default=8)
  p.add_argument("--smoke", action="store_true", help="lora and dyndora, 1 lr, 1 seed, 3 steps")
  args = p.parse_args(argv)
  if args.smoke:
    args.lrs, args.seeds, args.steps, args.limit, args.eval_limit = "1e-3", "0", 3, 32, 32
    args.max_length = 16
  args.max_length = args.max_length or 32   # truncates 5 of 8,551 CoLA training sentences
  args.batch = args.batch or 16              # the official batch size
  if not args.steps and not args.epochs:
    args.epochs = 2.0                        # configs/cola.py trains 4; 2 fit the hour
  grid.finish_flags(args)
  names = grid.parse_list(args.variants, str)
  unknown = [n for n in names if n not in VARIANTS]
  if unknown:
    raise ValueError(f"--variants {unknown} unknown; choose from {', '.join(VARIANTS)}.")
  os.makedirs(rank_dir(args), exist_ok=True)
  experiment.quiet_third_party_logs()
  variants = [V(v.name, v.method, {**v.overrides, "adapter.rank": args.rank}) for v in
              (VARIANTS[n] for n in names)]
  rows = grid.run_grid(variants, args, os.path.join(args.out, f"{args.name}.csv"), "mcc",
                       inspect=inspect(args))
  best = grid.best_by_variant(rows, "mcc", names, tune_seeds=grid.tune_seeds(args))
  grid.plot_best(best, os.path.join(args.out, f"{args.name}.png"), ylabel="CoLA dev MCC",
                 title=f"CoLA, rank {args.rank}: mean ± std over seeds {args.seeds} at each best lr",
                 chance=0.0)
  stored = {b["variant"]: [r for r in rows if r["variant"] == b["variant"]
                           and float(r["lr"]) == b["best_lr"] and r.get("status") != "nan"]
            for b in best}
  lines = ["| variant | best lr | stored adapter params after training | mean live rank |",
           "|---|---|---|---|"]
  for b in best:
    rs = stored[b["variant"]]
    if rs:
      lines.append(f"| {b['variant']} | {b['best_lr']:g} | "
                   f"{sum(float(r['adapter_params_stored']) for r in rs) / len(rs):,.0f} | "
                   f"{sum(float(r['mean_rank']) for r in rs) / len(rs):.2f} |")
  text = (f"DynDoRA vs LoRA on CoLA dev, all-MiniLM-L6-v2, rank {args.rank} (DynDoRA: r0 = "
          f"ceil(1.5·{args.rank}) pruned to {args.rank} on average), "
          f"{grid.settings_line(args, 'configs/cola.py')} The best lr is chosen on the dev "
          f"split it is scored on.\n\n{grid.markdown_best(best, 'mcc')}\n\n"
          + "\n".join(lines) + f"\n\n![]({args.name}.png)\n")
  sources = [(b, rank_source(b, rows, rank_dir(args))) for b in best]
  dyn = [(b, src) for b, src in sources if src]   # the pruned variants
  if dyn:
    b, (seed, stem) = dyn[0]
    shutil.copyfile(stem + ".png", os.path.join(args.out, f"{args.name}_ranks.png"))
    with open(stem + ".md") as f:
      text += (f"\n{b['variant']} live ranks per adapted kernel (lr {b['best_lr']:g}, "
               f"seed {seed}; ![]({args.name}_ranks.png)):\n\n" + f.read())
  with open(os.path.join(args.out, f"{args.name}.md"), "w") as f:
    f.write(text)
  print(text)


if __name__ == "__main__":
  main()
