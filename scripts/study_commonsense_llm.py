#!/usr/bin/env python3
r"""LoRA, DoRA, DoRAN and DynDoRA on the real SmolLM2-135M-Instruct over the commonsense suite.

The DoRA paper's Table 1 protocol (Liu et al. 2024) at 135M parameters and a 2-core CPU budget
(issue 31). Every run is one `experiment.train` call on configs/smollm2.py with the overrides
below, in its own workdir under --runs; a finished run is 'complete' to the library and is
skipped, so `--resume` is "rerun; finished runs are skipped" and the study spans sessions.

Data. Training: the union of the train.json files of boolq, ARC-Challenge, ARC-Easy and
openbookqa in ../shared/data/commonsense (data.source='commonsense', whose train_tasks default
is that union), in the DoRA paper's format (Alpaca prompt + 'the correct answer is X', loss on
the answer only), a fixed random subset of --limit examples (data.seed 0, the same for every
run), packed into rows of --max-length tokens, --batch rows a step. The batch order comes from
the run's seed, so at a given seed every method sees the same batches for the same steps.
Evaluation: the first N records of each of the 7 local test sets (boolq, piqa, social_i_qa,
winogrande, ARC-Challenge, ARC-Easy, openbookqa; data.eval_per_task), the same rows for every
run, scored by multiple-choice log-likelihood (generate.multiple_choice) and, in the final
runs, by the answer word extracted from greedy generation (generate.enabled, 12 new tokens).
HellaSwag (the paper's 8th task) is not kept locally. The average is over the 7 tasks.

Methods (alpha = 2 x rank everywhere, as configs/smollm2.py's r16 / alpha 32; no method recipe):
  lora, dora, doran   rank 16 on q, k, v, up, down (the DoRA paper's targets)
  dora_r8             DoRA at half rank (the paper's 'half rank' rows)
  dyndora             DynDoRA at the stored budget of lora r16: r0 = 24 components per kernel
                      pruned to 16 live on average (as scripts/study_dyndora_cola.py sets it),
                      pruning every max(1, steps // 20) steps from 15% to 50% of training
  lora_qv, dora_qv, doran_qv   rank 16 on q, v (DoRAN's targets); only with --qv
  zero_shot           the model as loaded, evaluated once (final-run evaluation)

Protocol. Phase 1 (grid): every method at each lr of --lrs on seed 0, --grid-steps steps,
scored by multiple choice only on --grid-per-task records per task (fewer steps and a smaller
eval subset than the final runs, to fit the budget). Each method's lr is the grid lr with the
highest average multiple-choice accuracy. Phase 2 (final): every method at its lr on each of
--seeds, --final-steps steps, both scorings on --final-per-task records per task. A grid run is
reused as the seed's final run only when its settings are identical (the workdir name holds the
settings, so identical settings land in the same workdir and the library reports it complete).
Same examples and steps for every method within a phase. AdamW with configs/smollm2.py's
defaults (linear decay, 10% warm-up, clip 1.0).

Cost, estimated (COST below; the estimate is printed at the start): on the idle 2-core AMD EPYC
a SmolLM2 DoRA step at batch 4 x 256 packed tokens takes ~6 s, and configs/smollm2.py's job (50
steps, two evaluations of 140 questions by both scorings) took 13 min, ~1.5 s per evaluated
question. At the defaults: 15 grid runs of ~6.2 min (40 steps, 70 questions) and 15 final runs of
~14.3 min (80 steps, 210 questions) plus the zero-shot evaluation (~6.3 min): about 5.2 h
(--qv adds 9 grid and 9 final runs, ~3.1 h). Other methods' steps were not timed (DoRAN's
generator adds work); other jobs on the 2 cores stretch all of it (the eval timing behind COST
ran 1.8x slower on the loaded machine).

  python scripts/study_commonsense_llm.py                  # the study (start)
  python scripts/study_commonsense_llm.py --resume         # continue in a later session
  python scripts/study_commonsense_llm.py --report-only    # rewrite the .md / .png from the CSV
  python scripts/study_commonsense_llm.py --reproduce lora,0.001,0,final   # rerun one cell, compare
  python scripts/study_commonsense_llm.py --smoke --out /tmp/cs --runs /tmp/cs_runs   # tiny model

Writes into --out (docs/results): commonsense_llm.csv (one row per run and the zero-shot row),
commonsense_llm.png (average accuracy per method, mean ± std and each seed) and
commonsense_llm.md (the tables in DoRA Table 1's shape; a pure function of the CSV rows, plus
the answer counts of the scored test rows for the constant-answer table: a run whose score on a
task equals that of one answer word given to every question is marked, since a small model
trained briefly can learn the answer format and a favourite label rather than the task).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from typing import Optional, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402

from configs import smollm2, tiny  # noqa: E402
from doran_jax import analysis, experiment, files, scoring, trainer  # noqa: E402
from doran_jax import run as run_lib  # noqa: E402
from doran_jax.data import commonsense  # noqa: E402
from scripts import grid  # noqa: E402
from scripts.study_stability import enable_compile_cache  # noqa: E402

NAME = "commonsense_llm"
QKVUD = r".*/(q_proj|k_proj|v_proj|up_proj|down_proj)/kernel"
QV = r".*/(q_proj|v_proj)/kernel"
TARGET_NAMES = {QKVUD: "q,k,v,up,down", QV: "q,v"}
# DoRA Table 1's column order (HellaSwag is not kept in ../shared/data/commonsense).
TASKS = ("boolq", "piqa", "social_i_qa", "winogrande", "ARC-Easy", "ARC-Challenge", "openbookqa")
TASK_LABELS = ("BoolQ", "PIQA", "SIQA", "WinoGrande", "ARC-e", "ARC-c", "OBQA")


def _variant(name: str, method: str, rank: int, targets: str) -> grid.Variant:
  return grid.Variant(name, method, {"adapter.rank": rank, "adapter.alpha": 2.0 * rank,
                                     "adapter.targets": targets})


VARIANTS = {v.name: v for v in (
    _variant("lora", "lora", 16, QKVUD), _variant("dora", "dora", 16, QKVUD),
    _variant("doran", "doran", 16, QKVUD), _variant("dora_r8", "dora", 8, QKVUD),
    # rank = the live budget; DynDoRA stores r0 = ceil(1.5 r) = 24 and prunes to 16 on average.
    _variant("dyndora", "dyndora", 16, QKVUD))}
QV_VARIANTS = {v.name: v for v in (
    _variant("lora_qv", "lora", 16, QV), _variant("dora_qv", "dora", 16, QV),
    _variant("doran_qv", "doran", 16, QV))}
ALL_VARIANTS = {**VARIANTS, **QV_VARIANTS}
# The differences the papers claim, (minuend, subtrahend), reported where both ran.
COMPARISONS = (("dora", "lora"), ("doran", "dora"), ("dora_r8", "lora"), ("dyndora", "lora"),
               ("dora_qv", "lora_qv"), ("doran_qv", "dora_qv"))

# Cost model of one run in seconds on the idle 2-core AMD EPYC: load and compile, per step (a
# DoRA step at batch 4 x 256 tokens), per evaluated question. configs/smollm2.py's evaluation
# costs ~1.5 s per question in all (140 questions in ~3.5 min); a compiled zero-shot pass over
# 42 questions, timed part by part on the loaded machine, spent 47% of it on the eval-loss pass
# over the eval records (every run makes it), 22% on multiple choice and 31% on generation.
COST = {"setup_s": 60.0, "step_s": 6.0, "loss_s": 0.7, "mc_s": 0.35, "gen_s": 0.45}

# --smoke: lora and dora, one lr, seeds 0 and 1, the grid at the final runs' settings (so the
# seed-0 final run is the grid run, reused): 3 trainings and the zero-shot evaluation.
SMOKE = dict(variants="lora,dora", lrs="1e-3", seeds="0,1", grid_steps=2, grid_per_task=2,
             grid_generation=True, final_steps=2, final_per_task=2, limit=32, batch=2,
             max_length=128, rank_divisor=4)

FIELDS = (("phase", "variant", "method", "rank", "targets", "lr", "seed", "steps", "eval_per_task",
           "scoring", "status")
          + tuple(f"mc_{t}" for t in TASKS) + ("mc_avg",)
          + tuple(f"gen_{t}" for t in TASKS) + ("gen_avg",)
          + ("train_minutes", "wall_s", "loss_spikes", "grad_norm_var", "grad_norm_mean",
             "final_loss", "adapter_params", "adapter_params_stored", "mean_live_rank",
             "batch", "max_length", "train_limit", "model", "workdir", "error"))


@dataclasses.dataclass(frozen=True)
class Phase:
  """Training length and evaluation of the runs of one phase."""

  name: str
  steps: int
  per_task: int
  generate: bool

  @property
  def scoring(self) -> str:
    return "mc+gen" if self.generate else "mc"


def phases(args) -> tuple[Phase, Phase]:
  return (Phase("grid", args.grid_steps, args.grid_per_task, args.grid_generation),
          Phase("final", args.final_steps, args.final_per_task, True))


def workdir_of(args, variant: str, lr: float, seed: int, phase: Phase) -> str:
  """<runs>/<variant>/lr<lr>_seed<seed>_<steps>steps_<n>pt_<scoring>: the name holds the settings,
  so a grid run with the final runs' settings is the same workdir (reused, not retrained)."""
  return os.path.join(args.runs, variant, f"lr{lr:g}_seed{seed}_{phase.steps}steps_"
                      f"{phase.per_task}pt_{phase.scoring}")


def run_config(variant: grid.Variant, lr: float, seed: int, phase: Phase, args):
  """configs/smollm2.py for one run (the tiny random LLaMA of configs/tiny.py with --smoke).

  Example:
    >>> run_config(VARIANTS["dora"], 1e-3, 0, phases(args)[1], args).adapter.rank
    16
  """
  sizes = argparse.Namespace(epochs=0.0, steps=phase.steps, batch=args.batch,
                             max_length=args.max_length, data=args.data, limit=args.limit,
                             eval_limit=0)
  if args.smoke:   # the tiny model's kernels are narrow: scale the ranks down
    overrides = dict(variant.overrides)
    rank = max(1, overrides["adapter.rank"] // SMOKE["rank_divisor"])
    overrides.update({"adapter.rank": rank, "adapter.alpha": 2.0 * rank})
    variant = dataclasses.replace(variant, overrides=overrides)
  config = grid.point_config(smollm2, variant, lr, seed, sizes)
  with config.unlocked():
    if args.smoke:
      config.model = tiny.get_config("kind=causal").model
    config.workdir = workdir_of(args, variant.name, lr, seed, phase)
    config.optim.warmup_steps = max(1, phase.steps // 10)   # smollm2.py: 5 of 50
    config.dyndora.prune_interval = max(1, phase.steps // 20)
    # The union to train on and the suite to score, named here (they are also the source's
    # defaults): the four local tasks with a train.json, all seven local test sets.
    config.data.train_tasks = commonsense.LOCAL_TRAIN_TASKS
    config.data.tasks = commonsense.LOCAL_TASKS
    config.data.eval_per_task = phase.per_task
    config.generate.limit_per_task = 0     # every eval record: eval_per_task already cut them
    config.generate.multiple_choice = True
    config.generate.enabled = phase.generate
    # A checkpoint every 20 steps: a run cut short at the end of a session resumes mid-way.
    config.checkpoint.every = 20
    # The LM head over every position, as the study's first runs computed it (before
    # data.target_logits_only): every cell of the study on one code path, so --reproduce of an
    # early cell compares like with like.
    config.data.target_logits_only = False
  return config


def _per_task(scores: Optional[dict], prefix: str) -> dict:
  """{'mc_boolq': .., 'mc_avg': ..} from a scorer's result (NaN where it did not run). The
  average is over tasks, as the paper's (the same as over questions with N per task)."""
  per = (scores or {}).get("per_task", {})
  out = {f"{prefix}_{t}": float(per[t]["accuracy"]) if t in per else float("nan") for t in TASKS}
  vals = [out[f"{prefix}_{t}"] for t in TASKS if t in per]
  out[f"{prefix}_avg"] = float(np.mean(vals)) if vals else float("nan")
  return out


def read_history(workdir: str) -> list[dict]:
  """The trainer's per-step loss and gradient norm from <workdir>/metrics.jsonl (a finished run
  skipped by --resume has no history in memory)."""
  path = os.path.join(workdir, "metrics.jsonl")
  out = []
  if os.path.isfile(path):
    with open(path) as f:
      for line in f:
        try:
          r = json.loads(line)
        except ValueError:
          continue
        if "train/loss" in r:
          out.append({"step": r["step"], "loss": r["train/loss"], "grad_norm": r["train/grad_norm"]})
  return out


def make_row(config, phase: Phase, variant: str, *, results: Optional[dict] = None,
             history: Sequence[dict] = (), wall_s: float = float("nan"), error: str = "") -> dict:
  """One CSV row from a run's config, its results (train()'s or the saved results.json) and its
  per-step history; a run stopped on a NaN loss has no results and status 'nan'."""
  a = config.adapter
  row = {"phase": phase.name, "variant": variant, "method": a.method, "rank": int(a.rank),
         "targets": TARGET_NAMES.get(a.targets, a.targets), "lr": float(config.optim.lr),
         "seed": int(config.seed), "steps": int(config.num_steps),
         "eval_per_task": int(config.data.eval_per_task), "scoring": phase.scoring,
         "batch": int(config.batch_size), "max_length": int(config.data.max_length),
         "train_limit": int(config.data.limit or 0),
         "model": config.model.tiny and f"tiny-{config.model.tiny}" or config.model.name,
         "workdir": config.workdir, "wall_s": wall_s, "error": error}
  if results is None:
    return {**row, "status": "nan", **_per_task(None, "mc"), **_per_task(None, "gen")}
  ev = results.get("eval", results)
  ranks = results.get("live_ranks")
  row.update(status="ok", **_per_task(ev.get("multiple_choice"), "mc"),
             **_per_task(ev.get("commonsense"), "gen"),
             train_minutes=float(results.get("train_minutes", 0.0)),
             adapter_params=int(results.get("adapter_params", 0)),
             adapter_params_stored=int(results.get("live_adapter_params",
                                                   results.get("adapter_params", 0))),
             mean_live_rank=float(np.mean(list(ranks.values()))) if ranks else float(a.rank))
  if history:
    losses = [h["loss"] for h in history]
    row.update(analysis.stability_stats(history),
               final_loss=float(np.mean(losses[-max(len(losses) // 10, 1):])))
  return row


FAILED = "study_failed.json"   # a run stopped on a NaN loss: rerunning would stop again
COST_FILE = "study_cost.json"  # wall time of the session that finished the run


def train_one(config, phase: Phase, variant: str) -> tuple[dict, bool]:
  """(row, trained now?) of one run: `experiment.train` in its workdir, which returns the saved
  results (status 'complete') without loading anything when the run already finished."""
  workdir = config.workdir
  if os.path.isfile(os.path.join(workdir, FAILED)):
    with open(os.path.join(workdir, FAILED)) as f:
      failed = json.load(f)
    return make_row(config, phase, variant, wall_s=failed["wall_s"], error=failed["error"]), False
  t0 = time.time()
  try:
    results = experiment.train(config, workdir)
  except trainer.NonFiniteLossError as e:
    failed = {"error": str(e).split(";")[0], "wall_s": time.time() - t0}
    files.write_json(os.path.join(workdir, FAILED), failed)
    return make_row(config, phase, variant, wall_s=failed["wall_s"], error=failed["error"]), True
  trained = results["status"] != "complete"
  if results["status"] not in ("done", "complete"):   # preempted: rerun with --resume
    raise SystemExit(f"{workdir}: training stopped ({results['status']}); rerun with --resume.")
  cost = os.path.join(workdir, COST_FILE)
  if trained:
    files.write_json(cost, {"wall_s": time.time() - t0})
  wall_s = float("nan")
  if os.path.isfile(cost):
    with open(cost) as f:
      wall_s = json.load(f)["wall_s"]
  return make_row(config, phase, variant, results=results, history=read_history(workdir),
                  wall_s=wall_s), trained


def zero_shot_one(config) -> tuple[dict, bool]:
  """The base model on the final runs' evaluation, once: saved in <runs>/zero_shot/... and read
  back on later calls (with a check that the evaluation settings are the same)."""
  phase = Phase("zero_shot", 0, int(config.data.eval_per_task), bool(config.generate.enabled))
  settings = {"model": config.model.to_dict(), "data_path": config.data.path,
              "eval_per_task": phase.per_task, "max_length": int(config.data.max_length),
              "generate": config.generate.to_dict()}
  path = os.path.join(config.workdir, "results.json")
  trained = not os.path.isfile(path)
  if trained:
    t0 = time.time()
    os.makedirs(config.workdir, exist_ok=True)
    out = experiment.zero_shot(run_lib.setup(config))
    files.write_json(path, {"settings": settings, "eval": out, "wall_s": time.time() - t0})
  with open(path) as f:
    saved = json.load(f)
  if saved["settings"] != json.loads(json.dumps(settings)):
    raise SystemExit(f"{path} holds a zero-shot evaluation under other settings; pass a new --runs.")
  row = make_row(config, phase, "zero_shot", results={"eval": saved["eval"]},
                 wall_s=saved["wall_s"])
  row.update(method="none", rank=0, targets="", lr="", seed="", steps=0, train_minutes=0.0,
             adapter_params=0, adapter_params_stored=0, mean_live_rank=0.0)
  return row, trained


# ------------------------------------------------------------------------------- reproduce

# What a rerun of a cell must give again: every score exactly (they count questions), the training
# statistics to float32 rounding of the logged values.
EXACT_FIELDS = tuple(f"{p}_{t}" for p in ("mc", "gen") for t in (*TASKS, "avg")) + (
    "adapter_params", "adapter_params_stored", "status")
CLOSE_FIELDS = ("final_loss", "grad_norm_mean", "grad_norm_var", "loss_spikes")


def compare_rows(recorded: dict, rerun: dict, rtol: float = 1e-6) -> list[str]:
  """The fields where a rerun of a cell differs from the recorded row ([] when it reproduces).

  Example:
    >>> compare_rows({"mc_avg": 0.5, "final_loss": 1.0}, {"mc_avg": 0.5, "final_loss": 1.0})
    []
  """
  diffs = []
  for key in EXACT_FIELDS + CLOSE_FIELDS:
    if key not in recorded:
      continue
    a, b = recorded[key], rerun.get(key)
    try:
      a, b = float(a), float(b)
    except (TypeError, ValueError):
      if str(a) != str(b):
        diffs.append(f"{key}: recorded {a!r}, rerun {b!r}")
      continue
    same = ((math.isnan(a) and math.isnan(b)) or a == b or
            (key in CLOSE_FIELDS and abs(a - b) <= rtol * max(abs(a), abs(b))))
    if not same:
      diffs.append(f"{key}: recorded {a!r}, rerun {b!r}")
  return diffs


def reproduce(args, cell: str, rows: Sequence[dict]) -> list[str]:
  """Reruns one recorded cell ('variant,lr,seed,phase') from scratch in a new workdir under
  <runs>/reproduce and returns compare_rows(recorded, rerun); the recorded run is not touched."""
  try:
    name, lr, seed, phase_name = [x.strip() for x in cell.split(",")]
    lr, seed = float(lr), int(seed)
  except ValueError:
    raise SystemExit(f"--reproduce {cell!r}: expected 'variant,lr,seed,phase', e.g. "
                     "'lora,0.001,0,final'.") from None
  phase = {p.name: p for p in phases(args)}.get(phase_name)
  recorded = [r for r in rows if r["variant"] == name and r["seed"] != "" and
              float(r["lr"]) == lr and int(r["seed"]) == seed and _in_phase(r, phase_name)]
  if phase is None or name not in ALL_VARIANTS or not recorded:
    cells = ", ".join(f"{r['variant']},{r['lr']:g},{r['seed']},{r['phase'].split('+')[-1]}"
                      for r in rows if r["phase"] != "zero_shot")
    raise SystemExit(f"--reproduce {cell!r}: no such recorded cell; the CSV holds {cells}.")
  scratch = argparse.Namespace(**{**vars(args), "runs": os.path.join(
      args.runs, "reproduce", time.strftime("%Y%m%d-%H%M%S"))})
  config = run_config(ALL_VARIANTS[name], lr, seed, phase, scratch)
  rerun, _ = train_one(config, phase, name)
  diffs = compare_rows(recorded[0], rerun)
  print(f"reproduce {cell} in {config.workdir}: " +
        ("every score and training statistic as recorded" if not diffs else
         "DIFFERS: " + "; ".join(diffs)), flush=True)
  return diffs


# ------------------------------------------------------------------------------------ report

def _in_phase(row: dict, phase: str) -> bool:
  """Whether a row belongs to a phase ('grid+final': a grid run reused as a final run)."""
  return phase in str(row["phase"]).split("+")


def best_lrs(rows: Sequence[dict]) -> dict[str, float]:
  """Each variant's grid lr with the highest average multiple-choice accuracy (seed-0 grid runs;
  a run that stopped on NaN never wins; ties go to the lower lr)."""
  out = {}
  for r in sorted((r for r in rows if _in_phase(r, "grid")), key=lambda r: float(r["lr"])):
    score = float(r["mc_avg"]) if r["status"] == "ok" else -math.inf
    if r["variant"] not in out or score > out[r["variant"]][1]:
      out[r["variant"]] = (float(r["lr"]), score)
  return {v: lr for v, (lr, _) in out.items()}


def _finals(rows, variant: str) -> list[dict]:
  return [r for r in rows if r["variant"] == variant and _in_phase(r, "final")]


def _stats(values) -> tuple[float, float, int]:
  x = np.asarray([v for v in values if np.isfinite(v)], np.float64)
  return (float(x.mean()) if len(x) else float("nan"),
          float(x.std(ddof=1)) if len(x) > 1 else float("nan"), len(x))


def _cell(values) -> str:
  mean, std, n = _stats(values)
  if not n:
    return "—"
  return f"{100 * mean:.1f}" + (f" ± {100 * std:.1f}" if n > 1 else "")


def welch(a: Sequence[float], b: Sequence[float]) -> dict:
  """Difference of means a − b, its standard error, Welch's t and the Welch–Satterthwaite df.

  Example:
    >>> welch([0.5, 0.6, 0.7], [0.4, 0.5, 0.6])["diff"]
    0.1
  """
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  out = {"diff": float(a.mean() - b.mean()) if len(a) and len(b) else float("nan"),
         "se": float("nan"), "t": float("nan"), "df": float("nan"), "n": (len(a), len(b))}
  if len(a) < 2 or len(b) < 2:
    return out
  va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
  se = math.sqrt(va + vb)
  out["se"] = se
  if se > 0:
    out["t"] = out["diff"] / se
    out["df"] = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
  return out


def _label(r: dict) -> str:
  return f"{r['variant']} (r{r['rank']}, {r['targets']})"


def _score_table(rows, variants, prefix: str, zero: Optional[dict]) -> str:
  head = "| method | lr | seeds | " + " | ".join(TASK_LABELS) + " | Avg. |"
  lines = [head, "|---" * (len(TASKS) + 4) + "|"]
  if zero is not None:
    cells = [_cell([float(zero[f"{prefix}_{t}"])]) for t in TASKS + ("avg",)]
    lines.append("| zero-shot (base model) | — | — | " + " | ".join(cells) + " |")
  for v in variants:
    fin = [r for r in _finals(rows, v) if r["status"] == "ok"]
    allf = _finals(rows, v)
    if not allf:
      continue
    nan = len(allf) - len(fin)
    seeds = f"{len(fin)}" + (f" (+{nan} NaN)" if nan else "")
    lines.append(f"| {_label(allf[0])} | {float(allf[0]['lr']):g} | {seeds} | " + " | ".join(
        _cell([float(r[f"{prefix}_{t}"]) for r in fin]) for t in TASKS)
        + f" | {_cell([float(r[f'{prefix}_avg']) for r in fin])} |")
  return "\n".join(lines)


def _order(rows, variants, prefix: str) -> list[tuple[str, float]]:
  """(variant, mean 7-task average) of the final runs, best first."""
  means = {v: _stats([float(r[f"{prefix}_avg"]) for r in _finals(rows, v) if r["status"] == "ok"])[0]
           for v in variants}
  return sorted(((v, m) for v, m in means.items() if np.isfinite(m)), key=lambda vm: -vm[1])


def _ordered(order: Sequence[tuple[str, float]]) -> str:
  return " > ".join(f"{v} ({100 * m:.1f})" for v, m in order) or "—"


def _fmt(x: float, digits: int = 1) -> str:
  return "—" if not np.isfinite(x) else f"{x:.{digits}f}"


def _differences(rows, variants) -> str:
  lines = ["| difference (7-task average) | scoring | Δ mean [points] | SE [points] | Welch t | df "
           "| seeds |", "|---|---|---|---|---|---|---|"]
  for a, b in COMPARISONS:
    if a not in variants or b not in variants:
      continue
    for prefix, name in (("mc", "multiple choice"), ("gen", "generation")):
      xa = [float(r[f"{prefix}_avg"]) for r in _finals(rows, a) if r["status"] == "ok"]
      xb = [float(r[f"{prefix}_avg"]) for r in _finals(rows, b) if r["status"] == "ok"]
      w = welch(xa, xb)
      lines.append(f"| {a} − {b} | {name} | {_fmt(100 * w['diff'])} | {_fmt(100 * w['se'])} | "
                   f"{_fmt(w['t'], 2)} | {_fmt(w['df'])} | {w['n'][0]} vs {w['n'][1]} |")
  return "\n".join(lines)


def _stability(rows, variants) -> str:
  """Per method: its lr and the grid behind it, then seed spread, stability and size of its
  final runs."""
  lines = ["| method | lr (grid: seed-0 MC average at each lr) | final MC avg seed spread (max − min) "
           "| loss spikes / run | grad-norm variance | adapter params trained (stored) | train min / run |",
           "|---|---|---|---|---|---|---|"]
  chosen = best_lrs(rows)
  for v in variants:
    grid_rows = sorted((r for r in rows if r["variant"] == v and _in_phase(r, "grid")),
                       key=lambda r: float(r["lr"]))
    lr = float(_finals(rows, v)[0]["lr"]) if _finals(rows, v) else chosen.get(v, float("nan"))
    g = ", ".join(f"{float(r['lr']):g}: " + (f"{100 * float(r['mc_avg']):.1f}" if r["status"] == "ok"
                                              else "NaN") for r in grid_rows)
    fin = [r for r in _finals(rows, v) if r["status"] == "ok"]
    if not fin:
      lines.append(f"| {v} | {lr:g} ({g}) | — | — | — | — | — |")
      continue
    avgs = [float(r["mc_avg"]) for r in fin]
    mean = lambda key: float(np.mean([float(r[key]) for r in fin]))
    lines.append(f"| {v} | {lr:g} ({g}) | {100 * (max(avgs) - min(avgs)):.1f} | "
                 f"{mean('loss_spikes'):.1f} | {mean('grad_norm_var'):.3g} | "
                 f"{mean('adapter_params'):,.0f} ({mean('adapter_params_stored'):,.0f}) | "
                 f"{mean('train_minutes'):.1f} |")
  return "\n".join(lines)


def _describe(rs: Sequence[dict], what: str) -> str:
  """'Grid: 40 steps, 10 records per task (70 questions), scored by ..., lrs ..., seeds 0'."""
  if not rs:
    return f"{what}: none yet"
  lrs = sorted({float(r["lr"]) for r in rs})
  seeds = sorted({int(r["seed"]) for r in rs})
  n = int(rs[0]["eval_per_task"])
  scoring = ("multiple choice and generation" if rs[0]["scoring"] == "mc+gen"
             else "multiple choice only")
  where = (f"lrs {', '.join(f'{lr:g}' for lr in lrs)}" if what == "Grid"
           else "each method at its grid lr")
  return (f"{what}: {int(rs[0]['steps'])} steps, {n} records per task ({7 * n} questions), scored "
          f"by {scoring}, {where}, seeds {', '.join(map(str, seeds))}")


def answer_counts(data_dir: str, per_task: int) -> dict[str, dict[str, int]]:
  """How often each answer word is the right one among the rows the runs are scored on (read and
  cut as the runs' eval split is: the first `per_task` records of each task's test.json), every
  word the records offer included.

  Example:
    >>> answer_counts("../shared/data/commonsense", 30)["boolq"]
    {'false': 5, 'true': 25}
  """
  records = commonsense.first_per_task(
      commonsense.read_split({"path": data_dir, "tasks": TASKS}, "eval", "test"), per_task)
  out = {task: {} for task in TASKS}
  for r in records:
    for word in scoring.commonsense_choices(r):
      out[r["task"]].setdefault(word, 0)
    out[r["task"]][r["answer"]] += 1
  return {task: dict(sorted(counts.items())) for task, counts in out.items()}


def _constant_words(score: float, counts: dict[str, int]) -> list[str]:
  """The answer words that, given to every question of a task, score exactly `score` there."""
  if not np.isfinite(score):
    return []
  right = round(score * sum(counts.values()))
  return [w for w, c in counts.items() if c == right]


def _constant_answers(rows, variants, answers: dict[str, dict[str, int]]) -> tuple[str, str]:
  """(table, summary): each final run's multiple-choice score per task, marked where it equals
  the score of one answer word given to every question; the best constant as a row of its own."""
  head = "| final run | " + " | ".join(TASK_LABELS) + " | Avg. | tasks at a constant: MC (generation) |"
  lines = [head, "|---" * (len(TASKS) + 3) + "|"]
  best = [max(answers[t].values()) / sum(answers[t].values()) for t in TASKS]
  lines.append("| best constant answer per task (an oracle: it knows each task's most frequent "
               "answer) | " + " | ".join(f"{100 * b:.1f} = {max(answers[t], key=answers[t].get)}"
                                         for b, t in zip(best, TASKS))
               + f" | {100 * float(np.mean(best)):.1f} | — |")
  at_constant = []
  for v in variants:
    for r in sorted((r for r in _finals(rows, v) if r["status"] == "ok"), key=lambda r: int(r["seed"])):
      words = {(p, t): _constant_words(float(r[f"{p}_{t}"]), answers[t])
               for p in ("mc", "gen") for t in TASKS}
      hits = {p: sum(bool(words[p, t]) for t in TASKS) for p in ("mc", "gen")}
      cells = [f"{100 * float(r[f'mc_{t}']):.1f}"
               + (f" = {'/'.join(words['mc', t])}" if words["mc", t] else "") for t in TASKS]
      at_constant.append(hits["mc"])
      lines.append(f"| {v} seed {int(r['seed'])} | " + " | ".join(cells)
                   + f" | {100 * float(r['mc_avg']):.1f} | {hits['mc']}/7 ({hits['gen']}/7) |")
  summary = (f"{sum(h >= 6 for h in at_constant)} of {len(at_constant)} final runs score, by "
             f"multiple choice, exactly what one constant answer scores on at least 6 of the 7 "
             f"tasks; the best constant per task averages {100 * float(np.mean(best)):.1f}")
  return "\n".join(lines), summary


def report(rows: Sequence[dict], answers: Optional[dict[str, dict[str, int]]] = None) -> str:
  """The markdown of the study: a pure function of the CSV rows and, when given, the answer
  counts of the scored rows (`answer_counts`), so --report-only rewrites it.

  Example:
    >>> text = report(analysis.read_csv("docs/results/commonsense_llm.csv"),
    ...               answer_counts("../shared/data/commonsense", 30))
  """
  rows = list(rows)
  zero = next((r for r in rows if r["phase"] == "zero_shot"), None)
  variants = list(dict.fromkeys(r["variant"] for r in rows if r["phase"] != "zero_shot"))
  runs = [r for r in rows if r["phase"] != "zero_shot"]
  grid_rows = [r for r in runs if _in_phase(r, "grid")]
  final_rows = [r for r in runs if _in_phase(r, "final")]
  any_row = (final_rows or grid_rows or rows)[0]
  smoke = str(any_row["model"]).startswith("tiny")
  qv = any(v.endswith("_qv") for v in variants)
  command = ("python scripts/study_commonsense_llm.py" + (" --smoke" if smoke else "")
             + (" --qv" if qv else "") + " --resume   (rerun until every run is done)")
  timed = [r for r in rows if np.isfinite(float(r["wall_s"]))]
  wall = [float(r["wall_s"]) for r in timed]
  by_phase = {p: sum(float(r["wall_s"]) for r in timed if r["phase"] == p)
              for p in dict.fromkeys(r["phase"] for r in rows)}
  cost = (f"{len(runs)} training runs" + (" + the zero-shot evaluation" if zero else "")
          + f": {sum(wall) / 3600:.2f} h of wall "
          f"time on the runs' machine (" + ", ".join(f"{p} {s / 60:.0f} min" for p, s in by_phase.items())
          + "; a run cut off mid-way counts only the session that finished it).")
  model = "a tiny random LLaMA (smoke test)" if smoke else "SmolLM2-135M-Instruct"
  mc_order, gen_order = _order(rows, variants, "mc"), _order(rows, variants, "gen")
  agree = ("the two scorings rank the methods the same way"
           if [v for v, _ in mc_order] == [v for v, _ in gen_order] else
           "**the two scorings rank the methods differently**")
  constant_section = []
  if answers is not None and final_rows:
    table, summary = _constant_answers(rows, variants, answers)
    constant_section = [
        f"Constant answers (no model; the final runs' {int(final_rows[0]['eval_per_task'])} rows "
        f"per task): a task's score when every question gets the same answer word. A run whose "
        f"count on a task equals a constant's (marked `= word`) is consistent with giving that "
        f"answer throughout (the CSV keeps counts, not the answers). {summary}.",
        "", table, ""]
  return "\n".join([
      f"## Commonsense reasoning on {model}: LoRA, DoRA, DoRAN, DynDoRA",
      "",
      f"Trained on the union of the boolq, ARC-Challenge, ARC-Easy and openbookqa training sets "
      f"(a fixed random subset of {int(any_row['train_limit'])} examples, the DoRA paper's prompt "
      f"format, loss on the answer), {int(any_row['batch'])} packed rows of "
      f"{int(any_row['max_length'])} tokens a step, AdamW (linear decay, 10% warm-up, clip 1.0), "
      f"alpha = 2 × rank. Evaluated on the first N records of each of the 7 local test sets (the "
      f"same rows for every run; HellaSwag is not kept locally). Each method's lr is the grid lr "
      f"with the best multiple-choice average on seed 0; the table reports the final runs at that "
      f"lr.",
      "",
      f"- {_describe(grid_rows, 'Grid')}.",
      f"- {_describe(final_rows, 'Final')}.",
      "",
      "Multiple-choice log-likelihood accuracy (%), mean ± std over seeds:",
      "",
      _score_table(rows, variants, "mc", zero),
      "",
      "Answer extracted from greedy generation, accuracy (%), mean ± std over seeds:",
      "",
      _score_table(rows, variants, "gen", zero),
      "",
      "Differences of the 7-task average (points; SE and Welch's t over seeds):",
      "",
      _differences(rows, variants),
      "",
      f"Order by average (ties in list order): multiple choice {_ordered(mc_order)}; generation "
      f"{_ordered(gen_order)}; {agree}.",
      "",
      f"Learning rates and stability (loss spike: a step whose loss exceeds "
      f"{analysis.SPIKE_FACTOR:g}× the median of the {analysis.SPIKE_WINDOW} steps before it; "
      f"gradient norm before clipping; final runs):",
      "",
      _stability(rows, variants),
      "",
      f"![]({NAME}.png)",
      "",
      f"Command: `{command}`",
      "",
      f"Cost: {cost}",
      "",
      *constant_section,
      "Conclusions (what held at this scale, where the scorings disagree, reproducibility, what "
      "a 7B run would need): [docs/studies.md](../studies.md), section \"Commonsense reasoning "
      "on SmolLM2-135M-Instruct\" (written by hand from these tables).",
      ""])


def plot(rows: Sequence[dict], path_png: str) -> None:
  """Average accuracy per method (bars: mean ± std over seeds; dots: each seed), multiple choice
  and generation side by side, the zero-shot model as a dashed line."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  variants = list(dict.fromkeys(r["variant"] for r in rows if r["phase"] != "zero_shot"))
  variants = [v for v in variants if _finals(rows, v)]
  zero = next((r for r in rows if r["phase"] == "zero_shot"), None)
  fig = Figure(figsize=(max(7.0, 1.3 * len(variants) + 3.0), 4.0))
  FigureCanvasAgg(fig)
  x = np.arange(len(variants))
  for i, (prefix, title) in enumerate((("mc", "multiple-choice log-likelihood"),
                                       ("gen", "answer from generation"))):
    ax = fig.add_subplot(1, 2, i + 1)
    vals = [[100 * float(r[f"{prefix}_avg"]) for r in _finals(rows, v) if r["status"] == "ok"]
            for v in variants]
    stats = [_stats(v) for v in vals]
    ax.bar(x, [s[0] for s in stats], yerr=[s[1] if s[2] > 1 else 0.0 for s in stats], capsize=4,
           color=[f"C{j % 10}" for j in range(len(variants))], alpha=0.7)
    for j, v in enumerate(vals):
      ax.plot([j] * len(v), v, "k.", ms=5)
    if zero is not None and np.isfinite(float(zero[f"{prefix}_avg"])):
      ax.axhline(100 * float(zero[f"{prefix}_avg"]), color="gray", ls="--", lw=1, label="zero-shot")
      ax.legend(fontsize=7)
    ax.set_xticks(x)
    ax.set_xticklabels(variants, fontsize=7, rotation=20)
    ax.set_ylabel("7-task average accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, axis="y")
  fig.suptitle("commonsense suite: mean ± std over seeds (dots: seeds) at each method's lr", fontsize=9)
  fig.tight_layout()
  fig.savefig(path_png, dpi=130)


def write_report(rows: Sequence[dict], out: str, data_dir: str = "") -> str:
  """Writes <out>/commonsense_llm.md and .png; the constant-answer table when `data_dir` (the
  commonsense folder the runs were scored on) is there."""
  per_task = {int(r["eval_per_task"]) for r in rows if _in_phase(r, "final")}
  answers = (answer_counts(data_dir, per_task.pop())
             if data_dir and os.path.isdir(data_dir) and len(per_task) == 1 else None)
  text = report(rows, answers)
  files.write_text(os.path.join(out, f"{NAME}.md"), text)
  plot(rows, os.path.join(out, f"{NAME}.png"))
  return text


# --------------------------------------------------------------------------------------- main

def estimate_minutes(phase: Phase) -> float:
  """COST's estimate of one run of `phase` (a zero-shot evaluation has 0 steps)."""
  per_q = COST["loss_s"] + COST["mc_s"] + (COST["gen_s"] if phase.generate else 0.0)
  return (COST["setup_s"] + phase.steps * COST["step_s"] + 7 * phase.per_task * per_q) / 60


def _merge(rows: list[dict], row: dict) -> None:
  """Adds a run's row, or marks the row of the same workdir as serving both phases."""
  for r in rows:
    if r["workdir"] == row["workdir"]:
      r["phase"] = f"{r['phase']}+{row['phase']}"
      return
  rows.append(row)


def data_dir_of(args) -> str:
  """The commonsense folder the runs read: --data, else configs/smollm2.py's (relative to the repo)."""
  path = args.data or smollm2.get_config().data.path
  return path if os.path.isabs(path) else os.path.join(grid.REPO, path)


def _parse(argv):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", default=os.path.join(grid.REPO, "docs", "results"))
  p.add_argument("--runs", default=os.path.join(grid.REPO, "runs", "study_commonsense_llm"),
                 help="study root: one workdir per run")
  p.add_argument("--variants", default=",".join(VARIANTS),
                 help=f"from {', '.join(ALL_VARIANTS)}")
  p.add_argument("--qv", action="store_true", help="also lora, dora, doran at rank 16 on q, v")
  p.add_argument("--lrs", default="3e-4,1e-3,3e-3", help="the grid (half-decade steps around "
                 "configs/smollm2.py's 5e-4)")
  p.add_argument("--seeds", default="0,1,2", help="final-run seeds; the grid runs on the first")
  p.add_argument("--grid-steps", type=int, default=40)
  p.add_argument("--grid-per-task", type=int, default=10)
  p.add_argument("--grid-generation", action="store_true",
                 help="score the grid runs by generation too (as the final runs)")
  p.add_argument("--final-steps", type=int, default=80)
  p.add_argument("--final-per-task", type=int, default=30)
  p.add_argument("--limit", type=int, default=1000, help="training subset of the union (fixed)")
  p.add_argument("--batch", type=int, default=0, help="0: configs/smollm2.py's (4)")
  p.add_argument("--max-length", type=int, default=0, help="0: configs/smollm2.py's (256)")
  p.add_argument("--data", default="", help="commonsense folder (default: the config's)")
  p.add_argument("--no-zero-shot", action="store_true")
  p.add_argument("--resume", action="store_true", help="continue: finished runs are skipped")
  p.add_argument("--report-only", action="store_true",
                 help="train nothing: rewrite the .md and .png from the CSV")
  p.add_argument("--reproduce", default="", metavar="VARIANT,LR,SEED,PHASE",
                 help="rerun one recorded cell from scratch (in <runs>/reproduce) and compare it "
                      "with its CSV row; exit 1 if anything differs")
  p.add_argument("--smoke", action="store_true",
                 help="configs/tiny.py's causal model, a few steps, 2 records per task")
  args = p.parse_args(argv)
  if args.smoke:
    for key in ("variants", "lrs", "seeds", "grid_steps", "grid_generation", "grid_per_task",
                "final_steps", "final_per_task", "limit", "batch", "max_length"):
      setattr(args, key, SMOKE[key])
  names = grid.parse_list(args.variants, str) + (list(QV_VARIANTS) if args.qv else [])
  unknown = [n for n in names if n not in ALL_VARIANTS]
  if unknown:
    raise ValueError(f"--variants {unknown} unknown; choose from "
                     f"{', '.join(ALL_VARIANTS)}.")
  args.variant_list = [ALL_VARIANTS[n] for n in dict.fromkeys(names)]
  return args


def main(argv=None):
  args = _parse(argv)
  csv_path = os.path.join(args.out, f"{NAME}.csv")
  os.makedirs(args.out, exist_ok=True)
  if args.report_only or args.reproduce:
    if not os.path.exists(csv_path):
      raise FileNotFoundError(f"no {csv_path} to report or reproduce; run the study first.")
    rows = analysis.read_csv(csv_path)
    if args.reproduce:
      experiment.quiet_third_party_logs()
      return 1 if reproduce(args, args.reproduce, rows) else 0
    print(write_report(rows, args.out, data_dir_of(args)))
    return
  if os.path.isdir(args.runs) and os.listdir(args.runs) and not args.resume:
    raise SystemExit(f"{args.runs} already holds runs: pass --resume to continue the study (finished "
                     "runs are skipped), or a new --runs.")
  experiment.quiet_third_party_logs()
  os.makedirs(args.runs, exist_ok=True)
  enable_compile_cache(os.path.join(args.runs, "jax_cache"))
  grid_phase, final_phase = phases(args)
  lrs, seeds = grid.parse_list(args.lrs), grid.parse_list(args.seeds, int)
  variants = args.variant_list
  n_grid, n_final = len(variants) * len(lrs), len(variants) * len(seeds)
  done = lambda path: os.path.isfile(os.path.join(path, "results.json"))
  left = sum(not done(workdir_of(args, v.name, lr, seeds[0], grid_phase))
             for v in variants for lr in lrs)
  zero_shot = Phase("zero_shot", 0, final_phase.per_task, True)
  total = (n_grid * estimate_minutes(grid_phase) + n_final * estimate_minutes(final_phase)
           + (0 if args.no_zero_shot else estimate_minutes(zero_shot)))
  print(f"plan: {n_grid} grid runs x ~{estimate_minutes(grid_phase):.0f} min + {n_final} final runs x "
        f"~{estimate_minutes(final_phase):.0f} min" + ("" if args.no_zero_shot else " + zero-shot eval")
        + f" = ~{total / 60:.1f} h on 2 cores (COST in the script; {left} grid runs not yet done; "
        "the final runs' lrs come from the grid)", flush=True)
  t0 = time.time()
  rows: list[dict] = []
  state = {"i": 0, "n": n_grid + n_final + (0 if args.no_zero_shot else 1)}

  def progress(row: dict, trained: bool) -> None:
    state["i"] += 1
    what = "trained" if trained else "already done"
    print(f"[{state['i']}/{state['n']}] {row['phase']} {row['variant']} lr {row['lr']} seed "
          f"{row['seed']}: {what}, MC avg {row['mc_avg']:.3f}, generation avg {row['gen_avg']:.3f} "
          f"(elapsed {(time.time() - t0) / 60:.1f} min)", flush=True)
    analysis.write_csv(rows, csv_path, FIELDS)

  for v in variants:
    for lr in lrs:
      row, trained = train_one(run_config(v, lr, seeds[0], grid_phase, args), grid_phase, v.name)
      _merge(rows, row)
      progress(row, trained)
  chosen = best_lrs(rows)
  print("lrs from the grid: " + ", ".join(f"{v}: {lr:g}" for v, lr in chosen.items()), flush=True)
  for v in variants:
    for seed in seeds:
      config = run_config(v, chosen[v.name], seed, final_phase, args)
      row, trained = train_one(config, final_phase, v.name)
      _merge(rows, row)
      progress(row, trained)
  if not args.no_zero_shot:
    config = run_config(variants[0], lrs[0], 0, final_phase, args)
    with config.unlocked():
      config.workdir = os.path.join(args.runs, "zero_shot",
                                    f"{final_phase.per_task}pt_{final_phase.scoring}")
    row, trained = zero_shot_one(config)
    rows.insert(0, row)
    progress(row, trained)
  # The report from the CSV as written, so --report-only gives the same text.
  print(write_report(analysis.read_csv(csv_path), args.out, data_dir_of(args)))


if __name__ == "__main__":
  sys.exit(main())
