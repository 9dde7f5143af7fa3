#!/usr/bin/env python3
r"""The DoRA paper's Figure 2 on the real all-MiniLM-L6-v2: ΔM vs ΔD of the query kernels.

Trains full fine-tuning, LoRA, DoRA and DoRAN with the library's trainer (query and value
kernels adapted, rank 8, alpha 16), keeps a checkpoint every --every steps, and measures for
each query kernel (6 layers) at each checkpoint the magnitude change ΔM and the direction
change ΔD against the pretrained weights (doran_jax.analysis). Writes into --out:

  weight_decomposition.png   the scatter, one panel per method, Pearson r in each title
  weight_decomposition.csv   one row per (method, checkpoint, layer)
  weight_decomposition.md    the summary table (also printed) and the exact settings
  weight_decomposition_training.png   loss curves and DoRAN's τ over training

  python scripts/analysis_figure.py                     # offline default data, ~10-15 min on 2 cores
  python scripts/analysis_figure.py --data sst2         # SST-2 from ../shared/data/text/sst2
  python scripts/analysis_figure.py --smoke --out /tmp/fig2   # a seconds-scale check of the pipeline

Runs go to runs/analysis_figure/<method> (started fresh; checkpoints deleted afterwards unless
--keep-checkpoints).
"""

from __future__ import annotations

import argparse
import os
import shutil
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from configs import default, sst2  # noqa: E402
from doran_jax import analysis, experiment  # noqa: E402

METHODS = ("full", "lora", "dora", "doran")
SST2 = os.path.join(os.path.dirname(REPO), "shared", "data", "text", "sst2")


def make_config(method: str, args):
  """The experiment's config for one method (documented in weight_decomposition.md)."""
  if args.data == "sst2":
    config = sst2.get_config(f"method={method}")
  else:
    config = default.get_config(f"method={method}")
  with config.unlocked():
    config.adapter.targets = r".*/(query|value)/kernel"
    config.adapter.rank = args.rank
    config.adapter.alpha = 2.0 * args.rank
    config.seed = args.seed
    config.num_steps = args.steps
    config.batch_size = args.batch
    config.optim.lr = args.full_lr if method == "full" else args.lr
    config.optim.warmup_steps = max(args.steps // 10, 1)
    config.checkpoint.every = args.every
    config.baselines = ()
    config.log_every = max(args.steps // 4, 1)
    if args.data == "sst2":
      config.data.path = args.sst2_path
      config.data.max_length = args.max_length
      config.data.eval_limit = args.eval_limit
  return config


def summary(outs: dict) -> list[dict]:
  """Per method: eval accuracy, Pearson r over all points, and the final-checkpoint means."""
  table = []
  for method, out in outs.items():
    table.append({
        "method": method, "accuracy": out["results"]["eval"]["accuracy"],
        **analysis.decomposition_summary(out["rows"]),
        "trainable_params": out["results"]["trainable_params"],
        "train_minutes": out["results"]["train_minutes"]})
  return table


def markdown(table: list[dict], args) -> str:
  data = ("SST-2 (../shared/data, max_length %d, dev subset %d)" % (args.max_length, args.eval_limit)
          if args.data == "sst2" else "the offline default data (chatterbot topics, 12 classes)")
  lines = [
      f"Weight decomposition (DoRA paper §3, Figure 2) on all-MiniLM-L6-v2, {data}: query and "
      f"value kernels adapted (rank {args.rank}, alpha {2 * args.rank}), {args.steps} steps at "
      f"batch {args.batch}, AdamW lr {args.lr:g} (full fine-tuning {args.full_lr:g}), seed "
      f"{args.seed}; ΔM and ΔD of the 6 query kernels at every {args.every}-step checkpoint.", "",
      "| method | Pearson r(ΔD, ΔM) | points | final mean ΔM | final mean ΔD | eval accuracy | "
      "trainable params | train min |",
      "|---|---|---|---|---|---|---|---|"]
  for r in table:
    lines.append(f"| {r['method']} | {r['corr']:+.3f} | {r['points']} | {r['final_delta_m']:.3e} | "
                 f"{r['final_delta_d']:.3e} | {r['accuracy']:.4f} | {r['trainable_params']:,} | "
                 f"{r['train_minutes']:.1f} |")
  return "\n".join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", default=os.path.join(REPO, "docs", "results"))
  p.add_argument("--runs", default=os.path.join(REPO, "runs", "analysis_figure"))
  p.add_argument("--data", choices=("default", "sst2"), default="default")
  p.add_argument("--sst2-path", default=SST2)
  p.add_argument("--methods", default=",".join(METHODS))
  p.add_argument("--steps", type=int, default=200)
  p.add_argument("--every", type=int, default=50, help="checkpoint (= analysis point) interval")
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--rank", type=int, default=8)
  p.add_argument("--lr", type=float, default=2e-3, help="adapters (configs/default.py's lr)")
  p.add_argument("--full-lr", type=float, default=1e-4, help="full fine-tuning")
  p.add_argument("--max-length", type=int, default=48, help="SST-2 only")
  p.add_argument("--eval-limit", type=int, default=512, help="SST-2 only")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--analyze", default=r".*/query/kernel", help="regex of the kernels plotted")
  p.add_argument("--keep-checkpoints", action="store_true")
  p.add_argument("--smoke", action="store_true", help="6 steps, checkpoints every 2: a pipeline check")
  args = p.parse_args(argv)
  if args.smoke:
    args.steps, args.every = 6, 2
  methods = [m.strip() for m in args.methods.split(",") if m.strip()]
  unknown = set(methods) - set(METHODS)
  if unknown:
    raise ValueError(f"--methods {sorted(unknown)} unknown; choose from {', '.join(METHODS)}.")
  os.makedirs(args.out, exist_ok=True)
  experiment.quiet_third_party_logs()
  t0 = time.time()
  outs = {}
  for method in methods:
    workdir = os.path.join(args.runs, method)
    outs[method] = analysis.trained_decomposition(make_config(method, args), workdir,
                                                  analyze=args.analyze)
    if not args.keep_checkpoints:
      shutil.rmtree(os.path.join(workdir, "checkpoints"), ignore_errors=True)
    print(f"{method}: r(ΔD, ΔM) = {analysis.correlation(outs[method]['rows']):+.3f}, "
          f"{(time.time() - t0) / 60:.1f} min so far", flush=True)
  rows = [r for out in outs.values() for r in out["rows"]]
  analysis.write_csv(rows, os.path.join(args.out, "weight_decomposition.csv"))
  analysis.plot_decomposition(
      {m: out["rows"] for m, out in outs.items()}, os.path.join(args.out, "weight_decomposition.png"),
      title="ΔM vs ΔD of MiniLM's query kernels (colour: step, marker: layer)")
  import matplotlib.pyplot as plt
  fig = analysis.plot_training({m: out["results"]["history"] for m, out in outs.items()},
                               [t for out in outs.values() for t in out["taus"]],
                               os.path.join(args.out, "weight_decomposition_training.png"))
  plt.close(fig)
  text = markdown(summary(outs), args)
  text += f"\n\nTotal wall time {(time.time() - t0) / 60:.1f} min.\n"
  text += "\n![ΔM vs ΔD](weight_decomposition.png)\n"
  with open(os.path.join(args.out, "weight_decomposition.md"), "w") as f:
    f.write(text)
  print(text)


if __name__ == "__main__":
  main()
