"""Shared pieces of scripts/lr_sweep.py and the studies: variants × lr grid × seeds on a config file.

A *variant* is a named method plus config overrides (e.g. 'doran_static_tau' = method doran with
adapter.generator=False). Every point trains from scratch (analysis.train_and_score), one CSV
row per run, resumable with --resume. Each variant is reported at its best lr (highest mean of
the metric over seeds on the eval split: the lr is chosen on the split it is scored on, as the
official DynDoRA grid does), with the seed spread (max − min), loss spikes and gradient-norm
variance (analysis.stability_stats) averaged over its seeds.

Example:
  >>> variants = [Variant("lora", "lora"), Variant("dora_tau", "doran", {"adapter.generator": False})]
  >>> rows = run_points(points(variants, [1e-4, 1e-3], [0, 1]), args)
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import time
from typing import Any, Callable, Mapping, Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(REPO), "shared", "data", "text")

import numpy as np  # noqa: E402

from doran_jax import analysis, config_lib, data  # noqa: E402
from doran_jax import run as run_lib  # noqa: E402
from scripts.study_stability import ModelCache, enable_compile_cache  # noqa: E402

FIELDS = ("variant", "method", "lr", "seed", "status", "accuracy", "mcc", "macro_f1", "final_loss",
          "loss_spikes", "grad_norm_var", "grad_norm_mean", "majority_accuracy", "steps",
          "train_examples", "eval_examples", "wall_s", "cpu_s", "error")


@dataclasses.dataclass(frozen=True)
class Variant:
  """A named method with dotted config overrides ({'adapter.generator': False})."""

  name: str
  method: str
  overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)


def load_config_module(path: str):
  """configs/<x>.py as a module (its get_config and LR table)."""
  if not os.path.isfile(path):
    raise ValueError(f"--config {path!r} is not a file; pass e.g. configs/sst2.py.")
  spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def add_flags(p: argparse.ArgumentParser, *, config: str, lrs: str, seeds: str, steps: int,
              limit: int, eval_limit: int, name: str) -> None:
  p.add_argument("--config", default=config, help="the config file the points start from")
  p.add_argument("--lrs", default=lrs, help="comma-separated peak learning rates")
  p.add_argument("--seeds", default=seeds)
  p.add_argument("--tune-seeds", default="",
                 help="seeds that run the whole lr grid; the other --seeds then run only at each "
                      "variant's best lr over these (default: every seed at every lr)")
  p.add_argument("--steps", type=int, default=steps, help="0: the config's num_epochs")
  p.add_argument("--epochs", type=float, default=0.0,
                 help="> 0: train this many epochs (overrides --steps and the config's epochs)")
  p.add_argument("--limit", type=int, default=limit, help="training subset (0: all)")
  p.add_argument("--eval-limit", type=int, default=eval_limit, help="eval subset (0: all)")
  p.add_argument("--batch", type=int, default=0, help="0: the config's batch size")
  p.add_argument("--max-length", type=int, default=0, help="0: the config's max_length")
  p.add_argument("--data", default="", help="data folder (default: the config's)")
  p.add_argument("--out", default=os.path.join(REPO, "docs", "results"))
  p.add_argument("--name", default=name, help="file stem of the CSV / markdown / PNG")
  p.add_argument("--runs", default=None, help="scratch workdirs (default runs/<name>)")
  p.add_argument("--resume", action="store_true", help="skip the points already in the CSV")
  p.add_argument("--report-only", action="store_true",
                 help="train nothing: write the tables from the CSV's rows (a grid cut short)")


def finish_flags(args) -> None:
  """--runs defaults to runs/<name>; --out is created."""
  args.runs = args.runs or os.path.join(REPO, "runs", args.name)
  os.makedirs(args.out, exist_ok=True)


def parse_list(text: str, cast=float) -> list:
  return [cast(x) for x in str(text).split(",") if x.strip()]


def point_config(module, variant: Variant, lr: float, seed: int, args):
  """The config of one point: the config file for the variant's method (with its recipe), the
  variant's overrides, then the study's sizes."""
  config = module.get_config(f"method={variant.method}")
  with config.unlocked():
    for path, value in variant.overrides.items():
      config_lib.set_path(config, path, value)
    config.seed = seed
    config.optim.lr = float(lr)
    if args.epochs:   # wins over --steps, which some scripts default to a step count
      config.num_epochs = args.epochs
      config.num_steps = 0
    elif args.steps:
      config.num_steps = args.steps
      if config.optim.get("warmup_ratio", None) is None and config.optim.warmup_steps > args.steps:
        # A point shorter than the config's warm-up (a smoke run) warms up over a tenth of its
        # steps: validation rejects a warm-up longer than the run.
        config.optim.warmup_steps = args.steps // 10
    if args.batch:
      config.batch_size = args.batch
    if args.max_length:
      config.data.max_length = args.max_length
    if args.data:
      config.data.path = args.data
    elif config.data.get("path") and not os.path.isabs(config.data.path) \
        and not os.path.exists(config.data.path):
      config.data.path = os.path.join(REPO, config.data.path)  # configs name it from the repo root
    config.data.limit = args.limit or None
    config.data.eval_limit = args.eval_limit or None
    config.checkpoint.every = 10**9   # the final checkpoint only
    config.log_every = 10**9
    config.baselines = ()
    config.progress_bar = False
  return config


def points(variants: Sequence[Variant], lrs: Sequence[float], seeds: Sequence[int]) -> list:
  return [(v, lr, s) for v in variants for lr in lrs for s in seeds]


def tune_seeds(args) -> list[int]:
  """The seeds that run every lr: --tune-seeds, or all of --seeds when it is empty."""
  seeds = parse_list(args.seeds, int)
  tune = parse_list(args.tune_seeds, int) if args.tune_seeds else seeds
  if not set(tune) <= set(seeds):
    raise ValueError(f"--tune-seeds {tune} must be among --seeds {seeds}.")
  return tune


def run_grid(variants: Sequence[Variant], args, csv_path: str, metric: str, *,
             inspect: Optional[Callable[[Variant, float, int, Any, dict], dict]] = None) -> list[dict]:
  """The lr grid of every variant on every seed; with --tune-seeds, the grid on those seeds only,
  then the other seeds at each variant's best lr over them (chosen before they run)."""
  tune = tune_seeds(args)
  rows = run_points(points(variants, parse_list(args.lrs), tune), args, csv_path, inspect=inspect)
  rest = [s for s in parse_list(args.seeds, int) if s not in tune]
  if rest and not args.report_only:
    best = best_by_variant(rows, metric, [v.name for v in variants], tune_seeds=tune)
    best_lr = {b["variant"]: b["best_lr"] for b in best}
    todo = [(v, best_lr[v.name], s) for v in variants if v.name in best_lr for s in rest]
    rows = run_points(todo, args, csv_path, inspect=inspect, resume=True)
  return rows


def run_points(todo: Sequence[tuple], args, csv_path: str, *,
               inspect: Optional[Callable[[Variant, float, int, Any, dict], dict]] = None,
               resume: Optional[bool] = None) -> list[dict]:
  """Runs every (variant, lr, seed) not yet in the CSV (with --resume, or resume=True); the CSV
  grows run by run. With --report-only, runs nothing and returns the CSV's rows."""
  if args.report_only:   # nothing to load or compile
    if not os.path.exists(csv_path):
      raise FileNotFoundError(f"--report-only: no {csv_path} to report; run the grid first.")
    return analysis.read_csv(csv_path)
  resume = args.resume if resume is None else resume
  rows = analysis.read_csv(csv_path) if resume and os.path.exists(csv_path) else []
  done = {(r["variant"], float(r["lr"]), int(r["seed"])) for r in rows}
  todo = [p for p in todo if (p[0].name, float(p[1]), int(p[2])) not in done]
  if not todo:
    return rows
  module = load_config_module(args.config)
  os.makedirs(args.runs, exist_ok=True)
  enable_compile_cache(os.path.join(args.runs, "jax_cache"))
  cache = None
  t0 = time.time()
  for i, (variant, lr, seed) in enumerate(todo):
    config = point_config(module, variant, lr, seed, args)
    if cache is None:  # MiniLM and its tokenizer loaded once; the head sized from the data
      tokenizer = run_lib.load_tokenizer(config)
      n_labels = data.load_dataset(config.data, "train", tokenizer=tokenizer).num_classes
      cache = ModelCache(config, num_labels=n_labels)
    hook = None if inspect is None else (lambda run, res, v=variant, l=lr, s=seed: inspect(v, l, s, run, res))
    row = analysis.train_and_score(config, os.path.join(args.runs, "point"), backbone=cache.fresh(),
                                   tokenizer=cache.tokenizer, inspect=hook)
    row["variant"] = variant.name
    rows.append(row)
    analysis.write_csv(rows, csv_path, FIELDS)
    eta = (time.time() - t0) / (i + 1) * (len(todo) - i - 1)
    print(f"[{i + 1}/{len(todo)}] {variant.name} lr {lr:g} seed {seed}: {row['status']} "
          f"accuracy {row['accuracy']:.4f} mcc {row.get('mcc', float('nan')):.4f} "
          f"({row['wall_s']:.0f} s, eta {eta / 60:.0f} min)", flush=True)
  return rows


def best_by_variant(rows: Sequence[dict], metric: str, variants: Sequence[str], *,
                    tune_seeds: Optional[Sequence[int]] = None) -> list[dict]:
  """Per variant: the lr with the highest mean `metric` over `tune_seeds` (default: every seed
  run), and that lr's statistics over every seed run at it. 'grid' maps each lr to its mean over
  all its seeds and 'grid_runs' to their number."""
  out = []
  for name in variants:
    mine = [r for r in rows if r["variant"] == name]
    if not mine:
      continue
    tuning = mine if tune_seeds is None else [r for r in mine if int(r["seed"]) in set(tune_seeds)]
    agg = analysis.aggregate(tuning or mine, ("lr",), value=metric)
    finite = [a for a in agg if np.isfinite(a["mean"])]
    best_lr = float((max(finite, key=lambda a: a["mean"]) if finite else agg[0])["lr"])
    every = analysis.aggregate(mine, ("lr",), value=metric)
    (best,) = [a for a in every if float(a["lr"]) == best_lr]
    at = [r for r in mine if float(r["lr"]) == best_lr and r.get("status") != "nan"]
    vals = np.array([float(r[metric]) for r in at], np.float64)
    mean_of = lambda key: float(np.mean([float(r[key]) for r in at])) if at else float("nan")
    out.append({"variant": name, "method": mine[0]["method"], "best_lr": best_lr,
                "mean": best["mean"], "std": best["std"], "runs": best["runs"], "nan": best["nan"],
                "chance": best["chance"],
                "spread": float(vals.max() - vals.min()) if len(vals) else float("nan"),
                "loss_spikes": mean_of("loss_spikes"), "grad_norm_var": mean_of("grad_norm_var"),
                "grid": {float(a["lr"]): a["mean"] for a in every},
                "grid_runs": {float(a["lr"]): a["runs"] for a in every}})
  return out


def markdown_best(best: Sequence[dict], metric: str) -> str:
  lines = [f"| variant | best lr | {metric} mean ± std | seed spread (max − min) | runs (at chance, NaN) "
           f"| loss spikes / run | grad-norm variance | mean {metric} at each lr of the grid (runs, where they differ) |",
           "|---|---|---|---|---|---|---|---|"]
  for b in best:
    counts = b["grid_runs"]
    per_lr = len(set(counts.values())) > 1   # say how many seeds stand behind each mean
    grid = ", ".join(f"{lr:g}: {m:.3f}" + (f" ({counts[lr]})" if per_lr else "")
                     for lr, m in sorted(b["grid"].items()))
    lines.append(f"| {b['variant']} | {b['best_lr']:g} | {analysis.mean_std_text(b['mean'], b['std'], b['runs'] - b['nan'])} | "
                 f"{b['spread']:.3f} | {b['runs']} ({b['chance']}, {b['nan']}) | "
                 f"{b['loss_spikes']:.1f} | {b['grad_norm_var']:.3g} | {grid} |")
  return "\n".join(lines)


def plot_best(best: Sequence[dict], path_png: str, *, ylabel: str, title: str,
              chance: Optional[float] = None) -> None:
  """Bar chart: each variant's mean ± std at its best lr."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  fig = Figure(figsize=(max(5.0, 1.0 * len(best) + 2.0), 4.2))
  FigureCanvasAgg(fig)
  ax = fig.add_subplot(1, 1, 1)
  x = np.arange(len(best))
  ax.bar(x, [b["mean"] for b in best], yerr=[b["std"] for b in best], capsize=4,
         color=[f"C{i % 10}" for i in range(len(best))])
  if chance is not None:
    ax.axhline(chance, color="gray", ls=":", lw=1, label="majority class")
    ax.legend(fontsize=8)
  ax.set_xticks(x)
  ax.set_xticklabels([f"{b['variant']}\nlr {b['best_lr']:g}" for b in best], fontsize=7, rotation=20)
  ax.set_ylabel(ylabel)
  ax.set_title(title, fontsize=9)
  ax.grid(alpha=0.3, axis="y")
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path_png)), exist_ok=True)
  fig.savefig(path_png, dpi=130)


def settings_line(args, module_name: str) -> str:
  seeds = (f"lrs {args.lrs} on seeds {args.tune_seeds}, then seeds {args.seeds} at each variant's "
           f"best lr over those" if args.tune_seeds else f"lrs {args.lrs}, seeds {args.seeds}")
  return (f"config {module_name}, {seeds}, "
          + (f"{args.epochs:g} epochs" if args.epochs else
             (f"{args.steps} steps" if args.steps else "the config's epochs"))
          + (f", batch {args.batch}" if args.batch else "")
          + (f", max_length {args.max_length}" if args.max_length else "")
          + f", train subset {args.limit or 'all'}, eval subset {args.eval_limit or 'all'}.")
