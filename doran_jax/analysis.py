"""The DoRA paper's weight-decomposition analysis (Liu et al. 2024, §3) and DoRAN's τ over training.

For a fine-tuned kernel W' against its pretrained W0 (Flax (in, out) layout, one column per
output unit; kernels stored (out, in), such as GPT-2's Conv1D, are transposed first):

  ΔM = mean_o | ‖W'_o‖ − ‖W0_o‖ |          magnitude change (units of the weights' column norm)
  ΔD = mean_o ( 1 − cos(W'_o, W0_o) )       direction change (dimensionless, in [0, 2])

computed per adapted kernel and per checkpoint. The ΔD-vs-ΔM scatter with its Pearson
correlation is the paper's Figure 2: LoRA moves magnitude and direction together (positive
slope); full fine-tuning and DoRA show a negative slope (large direction changes with small
magnitude changes, and the reverse).

Example:
  >>> base = target_weights(params_before, targets)               # host copy of W0 per target
  >>> rows = decomposition_rows(base, merged_params, targets, method="dora", step=100)
  >>> out = trained_decomposition(config, "runs/fig2/dora")        # train, then every checkpoint
  >>> plot_decomposition({"dora": out["rows"]}, "fig2.png")

The study helpers at the end (`train_and_score`, `aggregate`, `markdown_grid`, `plot_study`)
serve scripts/study_stability.py and scripts/study_sample_efficiency.py.
"""

from __future__ import annotations

import csv
import io
import os
import re
import shutil
import time
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import jax
import numpy as np

from doran_jax import checkpoint, evaluate, experiment, files, sharding, trainer
from doran_jax import run as run_lib
from doran_jax.adapters import AdapterConfig, dynrank, targets_for
from doran_jax.targets import SEP, Target, flatten
from doran_jax.trainable import effective_params, merge_params

ROW_FIELDS = ("method", "step", "layer", "block", "kind", "delta_m", "delta_d")


def magnitude_direction_change(w0_IxO, w1_IxO, eps: float = 1e-12) -> tuple[float, float]:
  """(ΔM, ΔD) between two kernels in (in, out) layout, computed in float64.

  Example:
    >>> magnitude_direction_change(w0, 2.0 * w0)   # (mean column norm of w0, 0.0)
  """
  w0 = np.asarray(w0_IxO, np.float64)
  w1 = np.asarray(w1_IxO, np.float64)
  if w0.shape != w1.shape or w0.ndim != 2:
    raise ValueError(f"need two 2-D kernels of one shape, got {w0.shape} and {w1.shape}.")
  n0_O = np.linalg.norm(w0, axis=0)
  n1_O = np.linalg.norm(w1, axis=0)
  # An all-zero column (real checkpoints have some) has no direction: cos = 0 by the floor.
  cos_O = np.sum(w0 * w1, axis=0) / np.maximum(n0_O * n1_O, eps)
  return float(np.mean(np.abs(n1_O - n0_O))), float(np.mean(1.0 - cos_O))


def target_weights(params: Mapping, targets: Sequence[Target]) -> dict[str, np.ndarray]:
  """Host copies {path: kernel} of the targeted kernels, in their stored layout.

  Take this snapshot of W0 before training: the trainer donates its state to the step.
  """
  flat = flatten(params)
  return {t.path: np.array(jax.device_get(flat[t.path])) for t in targets}


def decomposition_rows(base: Mapping, tuned: Mapping, targets: Sequence[Target],
                       **labels) -> list[dict]:
  """One {'layer', 'block', 'kind', 'delta_m', 'delta_d', **labels} row per target kernel.

  `base` and `tuned` are params trees or {path: kernel} dicts (as from `target_weights`).

  Example:
    >>> decomposition_rows(w0s, merged, targets, method="lora", step=200)[0]["delta_d"]
  """
  base, tuned = flatten(base), flatten(tuned)
  rows = []
  for t in targets:
    w0, w1 = np.asarray(base[t.path]), np.asarray(tuned[t.path])
    if t.transposed:  # stored (out, in): the output units must be the columns
      w0, w1 = w0.T, w1.T
    dm, dd = magnitude_direction_change(w0, w1)
    rows.append({"layer": t.module_path, "block": t.block, "kind": t.module_path.rsplit("/", 1)[-1],
                 "delta_m": dm, "delta_d": dd, **labels})
  return rows


def correlation(rows: Sequence[dict]) -> float:
  """Pearson correlation of ΔD and ΔM over rows (NaN with fewer than two distinct points)."""
  dm = np.array([r["delta_m"] for r in rows], np.float64)
  dd = np.array([r["delta_d"] for r in rows], np.float64)
  if len(rows) < 2 or dm.std() == 0 or dd.std() == 0:
    return float("nan")
  return float(np.corrcoef(dm, dd)[0, 1])


def decomposition_summary(rows: Sequence[dict]) -> dict:
  """Pearson r over all rows, and the mean ΔM and ΔD at the last checkpoint.

  Example:
    >>> decomposition_summary(out["rows"])
    {'corr': 0.3, 'points': 24, 'final_step': 200, 'final_delta_m': 0.01, 'final_delta_d': 2e-4}
  """
  last = max(r["step"] for r in rows)
  final = [r for r in rows if r["step"] == last]
  return {"corr": correlation(rows), "points": len(rows), "final_step": last,
          "final_delta_m": float(np.mean([r["delta_m"] for r in final])),
          "final_delta_d": float(np.mean([r["delta_d"] for r in final]))}


def tau_values(adapters: Mapping) -> dict[str, np.ndarray]:
  """DoRAN's τ = softplus(ρ) per adapted module ({} for other methods).

  Example:
    >>> tau_values(run.state.trainable["adapters"])["bert/encoder/layer/0/attention/self/query"]
  """
  flat = flatten(adapters.get("targets", {}))
  return {p.rsplit("/", 1)[0]: np.asarray(jax.nn.softplus(np.asarray(v, np.float32)))
          for p, v in sorted(flat.items()) if p.endswith("/tau")}


def checkpoint_trainables(run: Any, workdir: str) -> Iterator[tuple[int, Any]]:
  """Yields (step, trainable tree) for every checkpoint in `<workdir>/checkpoints`, oldest first.

  `run` is the trainer's Run the checkpoints were written with (it supplies shapes and
  shardings). Keep them all while training: `config.checkpoint.max_to_keep` large.
  """
  mngr = checkpoint.manager(os.path.join(workdir, "checkpoints"), async_save=False)
  abstract = sharding.abstract(run.state)
  try:
    for step in sorted(mngr.all_steps()):
      state, _ = checkpoint.restore(mngr, abstract, step)
      yield int(step), state.trainable
  finally:
    mngr.close()


def checkpoint_decomposition(run: Any, workdir: str, base: Mapping,
                             targets: Optional[Sequence[Target]] = None,
                             **labels) -> tuple[list[dict], list[dict]]:
  """ΔM/ΔD rows and τ rows for every checkpoint of a run.

  Args:
    run: the trainer's Run (after `experiment.train(config, workdir, run=run)`).
    workdir: the run's workdir.
    base: W0 per target (`target_weights` taken before training).
    targets: kernels to analyse (default: every kernel in `base`, which must then be a
      `target_weights` dict of this run's adapted targets).
    **labels: added to every row (e.g. method="dora").

  Returns:
    (decomposition rows with a 'step' label, τ rows {'step', 'layer', 'tau'}; empty unless doran).
  """
  if targets is None:
    targets = [t for t in _adapted_targets(run) if t.path in base]
  merge = jax.jit(lambda f, t: _targets_only(effective_params(f, t, run.adapter_cfg), targets))
  rows, taus = [], []
  for step, trainable in checkpoint_trainables(run, workdir):
    tuned = jax.device_get(merge(run.frozen, trainable))
    rows += decomposition_rows(base, tuned, targets, **labels, step=step)
    for layer, tau in tau_values(jax.device_get(trainable["adapters"])).items():
      taus.append({**labels, "step": step, "layer": layer, "tau": float(np.mean(tau))})
  return rows, taus


def trained_decomposition(config, workdir: str, *, analyze: Optional[str] = None,
                          fresh: bool = True) -> dict:
  """Trains `config` with `experiment.train`, keeping every checkpoint, and analyses them.

  Checkpoints come every `config.checkpoint.every` steps (all kept); each gives one ΔM/ΔD row per
  analysed kernel and, for DoRAN, τ per adapted kernel.

  Args:
    config: a trainer config (e.g. `configs/default.py`'s, with `checkpoint.every` set).
    workdir: where the run writes; emptied first when `fresh` (a leftover would resume).
    analyze: regex over kernel paths to analyse (default: the adapted targets); e.g. the DoRA
      paper's Figure 2 uses only the query kernels, r".*/query/kernel".

  Returns:
    {'results': train()'s results, 'rows': ΔM/ΔD rows, 'taus': τ rows, 'run': the Run}.

  Example:
    >>> out = trained_decomposition(default.get_config("method=dora"), "runs/fig2/dora",
    ...                             analyze=r".*/query/kernel")
    >>> correlation(out["rows"])
  """
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.checkpoint.max_to_keep = 10**6
  if fresh:
    shutil.rmtree(workdir, ignore_errors=True)
  run = run_lib.setup(config)
  targets = _adapted_targets(run)
  if analyze:
    targets = [t for t in targets if re.fullmatch(analyze, t.path)]
    if not targets:
      raise ValueError(f"analyze regex {analyze!r} matches none of the adapted kernels "
                       f"({config.adapter.targets!r}).")
  # W0 before the first step: the trainer donates its state to the step function.
  base = target_weights(evaluate.merged_params(run.frozen, run.state.trainable, run.adapter_cfg),
                        targets)
  results = experiment.train(config, workdir, run=run)
  method = run.adapter_cfg.method
  rows, taus = checkpoint_decomposition(run, workdir, base, targets, method=method)
  return {"results": results, "rows": rows, "taus": taus, "run": run}


def _adapted_targets(run) -> list[Target]:
  cfg: AdapterConfig = run.adapter_cfg
  params = merge_params(run.frozen, jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), run.state.trainable["params"]))
  return targets_for(params, cfg)


def _targets_only(params, targets):
  flat = flatten(params)
  return {t.path: flat[t.path] for t in targets}


def write_csv(rows: Sequence[dict], path: str, fields: Sequence[str] = ROW_FIELDS) -> None:
  """Writes rows with `fields` first and any other keys after them."""
  extra = sorted({k for r in rows for k in r} - set(fields))
  buffer = io.StringIO(newline="")
  writer = csv.DictWriter(buffer, fieldnames=[*fields, *extra], restval="")
  writer.writeheader()
  writer.writerows(rows)
  files.write_text(path, buffer.getvalue())


def plot_decomposition(rows_by_method: Mapping[str, Sequence[dict]], path_png: str,
                       title: Optional[str] = None) -> None:
  """The Figure-2 scatter: ΔM against ΔD, one panel per method.

  Colour is the training step, the marker the transformer block, the dashed line the
  least-squares fit; each panel's title gives the Pearson correlation.
  """
  import matplotlib.pyplot as plt
  methods = list(rows_by_method)
  markers = "o^sDvP*Xh<>p"
  all_steps = sorted({r.get("step", 0) for rs in rows_by_method.values() for r in rs})
  cmap = plt.get_cmap("viridis")
  color = {s: cmap(i / max(len(all_steps) - 1, 1)) for i, s in enumerate(all_steps)}
  ncols = min(len(methods), 2)
  nrows = -(-len(methods) // ncols)
  fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols + 1.2, 3.7 * nrows), squeeze=False)
  for ax in axes.flat[len(methods):]:
    ax.set_visible(False)
  for ax, method in zip(axes.flat, methods):
    rows = rows_by_method[method]
    for r in rows:
      ax.scatter(r["delta_d"], r["delta_m"], s=24, color=color[r.get("step", 0)],
                 marker=markers[int(r.get("block", 0)) % len(markers)], edgecolors="none")
    if len(rows) >= 2 and np.ptp([r["delta_d"] for r in rows]) > 0:
      dd = np.array([r["delta_d"] for r in rows])
      slope, icpt = np.polyfit(dd, [r["delta_m"] for r in rows], 1)
      xs = np.linspace(dd.min(), dd.max(), 2)
      ax.plot(xs, slope * xs + icpt, "k--", lw=1)
    ax.set_title(f"{method}  (Pearson r = {correlation(rows):+.2f})", fontsize=10)
    ax.set_xlabel("ΔD: mean (1 − cos)  [dimensionless]", fontsize=9)
    ax.set_ylabel("ΔM: mean |Δ column norm|  [weight units]", fontsize=9)
    ax.ticklabel_format(axis="both", style="sci", scilimits=(-2, 3), useMathText=True)
  handles = [plt.Line2D([], [], ls="", marker="o", color=color[s], label=f"step {s}")
             for s in all_steps]
  blocks = sorted({int(r.get("block", 0)) for rs in rows_by_method.values() for r in rs})
  handles += [plt.Line2D([], [], ls="", marker=markers[b % len(markers)], color="gray",
                         label=f"block {b}") for b in blocks]
  fig.legend(handles=handles, loc="center right", fontsize=7, frameon=False)
  if title:
    fig.suptitle(title, fontsize=11)
  fig.tight_layout(rect=(0, 0, 1 - 1.1 / fig.get_figwidth(), 1))
  fig.savefig(path_png, dpi=130)
  plt.close(fig)


def plot_training(histories: Mapping[str, Sequence[dict]], tau_rows: Sequence[dict],
                  path_png: Optional[str] = None):
  """Loss curves per method (left) and DoRAN's τ per adapted kernel over training (right).

  Returns the figure; saves it as PNG when `path_png` is given.
  """
  import matplotlib.pyplot as plt
  fig, (ax_loss, ax_tau) = plt.subplots(1, 2, figsize=(11, 3.8))
  for method, hist in histories.items():
    steps = np.array([h["step"] for h in hist])
    loss = np.array([h["loss"] for h in hist])
    smooth = np.convolve(loss, np.ones(5) / 5, mode="valid") if len(loss) >= 5 else loss
    ax_loss.plot(steps[len(steps) - len(smooth):], smooth, label=method)
  ax_loss.set_xlabel("training step")
  ax_loss.set_ylabel("training loss [cross-entropy, nats] (5-step mean)")
  ax_loss.set_title("loss curves")
  ax_loss.legend()
  layers = sorted({r["layer"] for r in tau_rows})
  kinds = sorted({layer.rsplit("/", 1)[-1] for layer in layers})
  blocks = sorted({_block(layer) for layer in layers})
  cmap = plt.get_cmap("viridis")
  for layer in layers:
    pts = sorted((r["step"], r["tau"]) for r in tau_rows if r["layer"] == layer)
    # Colour = block, line style = projection kind: 12 kernels stay readable.
    ax_tau.plot(*zip(*pts), marker="o", ms=3, lw=1,
                color=cmap(blocks.index(_block(layer)) / max(len(blocks) - 1, 1)),
                ls=("-", "--", ":", "-.")[kinds.index(layer.rsplit("/", 1)[-1]) % 4],
                label=_short(layer))
  ax_tau.set_xlabel("training step")
  ax_tau.set_ylabel("τ = softplus(ρ)  [column-norm units]")
  ax_tau.set_title("DoRAN: learnable τ per adapted kernel")
  if tau_rows:
    ax_tau.legend(fontsize=6, ncol=2)
  fig.tight_layout()
  if path_png:
    fig.savefig(path_png, dpi=130)
  return fig


def _block(layer: str) -> int:
  return next((int(p) for p in layer.split("/") if p.isdigit()), 0)


def _short(layer: str) -> str:
  return f"L{_block(layer)} {layer.rsplit('/', 1)[-1]}"


# ----------------------------------------------------------------------------------- studies

SPIKE_FACTOR = 2.0   # a loss spike: loss above SPIKE_FACTOR × the running median ...
SPIKE_WINDOW = 20    # ... of the SPIKE_WINDOW steps before it


def loss_spikes(losses: Sequence[float], factor: float = SPIKE_FACTOR,
                window: int = SPIKE_WINDOW) -> int:
  """Steps t >= window whose loss exceeds `factor` × median(losses[t - window:t]).

  Example:
    >>> loss_spikes([1.0] * 20 + [2.5, 1.0])
    1
  """
  x = np.asarray(losses, np.float64)
  return int(sum(x[t] > factor * np.median(x[t - window:t]) for t in range(window, len(x))))


def stability_stats(history: Sequence[dict], factor: float = SPIKE_FACTOR,
                    window: int = SPIKE_WINDOW) -> dict:
  """Stability of one run from the trainer's per-step history: loss spikes (`loss_spikes`) and
  the variance of the gradient's global norm over all steps (before clipping)."""
  losses = [h["loss"] for h in history]
  grads = np.asarray([h["grad_norm"] for h in history], np.float64)
  return {"loss_spikes": loss_spikes(losses, factor, window),
          "grad_norm_var": float(grads.var()) if len(grads) else float("nan"),
          "grad_norm_mean": float(grads.mean()) if len(grads) else float("nan")}


def at_chance(accuracy: float, majority: float, mcc: float = float("nan"),
              margin: float = 0.05) -> bool:
  """Whether a run did no better than a constant prediction: accuracy below the eval set's
  largest class fraction + `margin`, unless its MCC (0 for every constant prediction) reaches
  2·`margin`. On an imbalanced set (CoLA: 69% one class) accuracy hardly leaves the majority
  fraction while MCC shows the classes are told apart.

  Example:
    >>> at_chance(0.70, 0.686, mcc=0.17), at_chance(0.69, 0.686, mcc=0.0)
    (False, True)
  """
  if accuracy >= majority + margin:
    return False
  return not (np.isfinite(mcc) and mcc >= 2 * margin)


def train_and_score(config, workdir: str, *, chance_margin: float = 0.05,
                    keep: bool = False, backbone=None, tokenizer=None,
                    inspect: Optional[Callable[[Any, dict], dict]] = None) -> dict:
  """One study point: trains `config` from scratch and returns a flat result row.

  A NaN/Inf loss (`trainer.NonFiniteLossError`) is a result here, not an error: the row gets
  status 'nan' and accuracy NaN. 'chance' marks a finished run that did not beat a constant
  prediction (`at_chance`).
  `backbone` and `tokenizer` pass to `run.setup` (a grid reuses one loaded model; the
  backbone is consumed, so give each call its own copy). The row also has the eval MCC and
  `stability_stats` of the run; `inspect(run, results)` may add more keys (e.g. live ranks).

  Example:
    >>> row = train_and_score(sst2.get_config("method=dora,lr=1e-2"), "/tmp/point")
    >>> row["status"], row["accuracy"]
    ('ok', 0.84)
  """
  shutil.rmtree(workdir, ignore_errors=True)  # a leftover checkpoint would resume, not retrain
  t0 = time.time()
  cpu0 = time.process_time()
  run = run_lib.setup(config, backbone=backbone, tokenizer=tokenizer)
  # The eval set's own majority fraction: a small training subset may favour the other class.
  counts = np.bincount(np.asarray(run.eval_data.arrays["labels"]), minlength=run.eval_data.num_classes)
  majority = float(counts.max() / counts.sum())
  row = {"method": config.adapter.method, "lr": float(run.config.optim.lr), "seed": int(config.seed),
         "limit": config.data.get("limit", None) or len(run.train_data),
         "train_examples": len(run.train_data), "eval_examples": len(run.eval_data),
         "steps": run.num_steps, "majority_accuracy": majority}
  try:
    results = experiment.train(config, workdir, run=run)
  except trainer.NonFiniteLossError as e:
    row.update(status="nan", accuracy=float("nan"), macro_f1=float("nan"), mcc=float("nan"),
               final_loss=float("nan"), loss_spikes=float("nan"), grad_norm_var=float("nan"),
               grad_norm_mean=float("nan"), error=str(e).split(";")[0])
  else:
    losses = [h["loss"] for h in results["history"]]
    tail = losses[-max(len(losses) // 10, 1):]
    acc = float(results["eval"]["accuracy"])
    mcc = float(results["eval"].get("mcc", float("nan")))
    row.update(status="chance" if at_chance(acc, majority, mcc, chance_margin) else "ok",
               accuracy=acc, macro_f1=float(results["eval"].get("macro_f1", float("nan"))), mcc=mcc,
               final_loss=float(np.mean(tail)), error="", **stability_stats(results["history"]))
    if inspect is not None:
      row.update(inspect(run, results))
  row.update(wall_s=time.time() - t0, cpu_s=time.process_time() - cpu0)
  if not keep:
    shutil.rmtree(workdir, ignore_errors=True)
  return row


def aggregate(rows: Sequence[dict], keys: Sequence[str], value: str = "accuracy") -> list[dict]:
  """Groups rows by `keys`: mean and std of `value` over finished runs, and run counts.

  Rows with status 'nan' have no final model: they count in 'runs' and 'nan' but not in the
  mean. 'failed' = NaN stops + runs that ended at chance accuracy (too slow to learn, or
  collapsed to one class). Groups keep first-seen order.

  Example:
    >>> aggregate(rows, ("method", "lr"))[0]
    {'method': 'lora', 'lr': 0.001, 'mean': 0.83, 'std': 0.01, 'runs': 3, 'nan': 0, ...}
  """
  groups: dict[tuple, list[dict]] = {}
  for r in rows:
    groups.setdefault(tuple(r[k] for k in keys), []).append(r)
  out = []
  for key, rs in groups.items():
    vals = np.array([float(r[value]) for r in rs if r.get("status") != "nan"], np.float64)
    n_nan = sum(r.get("status") == "nan" for r in rs)
    n_chance = sum(r.get("status") == "chance" for r in rs)
    out.append({**dict(zip(keys, key)),
                "mean": float(vals.mean()) if len(vals) else float("nan"),
                "std": float(vals.std(ddof=1)) if len(vals) > 1 else (0.0 if len(vals) else float("nan")),
                "runs": len(rs), "nan": n_nan, "chance": n_chance, "failed": n_nan + n_chance})
  return out


def mean_std_text(mean: float, std: float, finished: int) -> str:
  """'0.812 ± 0.010'; one finished run has no spread, so it reads '0.812 (1 run)', not '± 0.000'.

  >>> mean_std_text(0.8123, 0.0, 1)
  '0.812 (1 run)'
  """
  if np.isnan(mean):
    return "—"
  return f"{mean:.3f} (1 run)" if finished == 1 else f"{mean:.3f} ± {std:.3f}"


def _failed_label(a: dict) -> str:
  label = f"{a['chance']}/{a['runs']} at chance"
  return label + (f", {a['nan']} NaN" if a["nan"] else "")


def markdown_grid(agg: Sequence[dict], row_key: str, col_key: str, *, row_label: str = "",
                  fmt=lambda v: f"{v:g}", show_failed: bool = True) -> str:
  """A markdown table of aggregated results: one row per `row_key`, one column per `col_key`.

  Cells read 'mean ± std' and, with `show_failed`, how many runs ended at chance and how many
  stopped on a NaN: '(1/3 at chance)', '(1/3 at chance, 1 NaN)'.
  """
  rows = list(dict.fromkeys(a[row_key] for a in agg))
  cols = list(dict.fromkeys(a[col_key] for a in agg))
  cell = {(a[row_key], a[col_key]): a for a in agg}
  lines = [f"| {row_label or row_key} | " + " | ".join(str(c) for c in cols) + " |",
           "|---" * (len(cols) + 1) + "|"]
  for r in rows:
    items = []
    for c in cols:
      a = cell.get((r, c))
      if a is None:
        items.append("")
        continue
      text = mean_std_text(a["mean"], a["std"], a["runs"] - a["nan"])
      if show_failed:
        text += f" ({_failed_label(a)})"
      items.append(text)
    lines.append(f"| {fmt(r)} | " + " | ".join(items) + " |")
  return "\n".join(lines)


def plot_study(agg: Sequence[dict], x_key: str, group_key: str, path_png: str, *, xlabel: str,
               ylabel: str, title: str = "", chance: Optional[float] = None,
               logx: bool = True) -> None:
  """Mean ± std of each group against `x_key`; groups with failed runs are annotated."""
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6.4, 4.2))
  for i, group in enumerate(dict.fromkeys(a[group_key] for a in agg)):
    pts = sorted((a[x_key], a["mean"], a["std"], a["failed"], _failed_label(a)) for a in agg
                 if a[group_key] == group)
    xs = np.array([p[0] for p in pts], np.float64)
    # Small offsets on the log axis keep the error bars of the methods apart.
    shift = xs * (1.0 + 0.04 * (i - 1)) if logx else xs
    line = ax.errorbar(shift, [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", ms=4,
                       capsize=3, label=str(group))
    for x, p in zip(shift, pts):
      if p[3]:
        ax.annotate(p[4].replace(" at chance", " chance"), (x, p[1] if np.isfinite(p[1]) else chance or 0.5),
                    textcoords="offset points", xytext=(0, -12 - 9 * i), ha="center", fontsize=7,
                    color=line[0].get_color())
  if chance is not None:
    ax.axhline(chance, color="gray", ls=":", lw=1, label="majority class")
  if logx:
    ax.set_xscale("log")
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  if title:
    ax.set_title(title, fontsize=10)
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path_png, dpi=130)
  plt.close(fig)


def read_csv(path: str) -> list[dict]:
  """Rows written by `write_csv`, numbers parsed back (for resuming a study)."""
  def parse(v):
    for cast in (int, float):
      try:
        return cast(v)
      except ValueError:
        pass
    return v
  with open(path, newline="") as f:
    return [{k: parse(v) for k, v in r.items()} for r in csv.DictReader(f)]


# ----------------------------------------------------------------------------- DynDoRA ranks

def rank_report(adapters: Mapping[str, Any], path_png: Optional[str] = None) -> str:
  """A text table of the live rank per adapted kernel, and optionally a bar plot saved as PNG.

  Example:
    >>> print(rank_report(state.trainable["adapters"], "runs/cola/rank_allocation.png"))
    | module | live | stored |
    ...
  """
  factors = dynrank.component_factors(adapters)
  ranks = dynrank.live_ranks(adapters)
  names = _short_names(list(ranks))
  stored = {m: int(c.size) for m, (_, _, c) in factors.items()}
  n_live, n_stored = sum(ranks.values()), sum(stored.values())
  live_params = dynrank.count_live_params(adapters)
  stored_params = sum(int(a.size + b.size + c.size) for a, b, c in factors.values())
  width = max(len("module"), *(len(s) for s in names.values()))
  lines = [f"| {'module':<{width}} | live | stored |", f"|{'-' * (width + 2)}|------|--------|"]
  for m in ranks:
    lines.append(f"| {names[m]:<{width}} | {ranks[m]:>4} | {stored[m]:>6} |")
  lines.append(f"| {'mean':<{width}} | {n_live / len(ranks):>4.2f} | "
               f"{n_stored / len(ranks):>6.2f} |")
  lines.append(f"{n_live} of {n_stored} components live in {len(ranks)} targets; live parameters "
               f"{live_params:,} of {stored_params:,} stored ({100 * live_params / stored_params:.1f}%).")
  if path_png:
    _bar_plot(ranks, stored, names, path_png)
    lines.append(f"plot: {path_png}")
  return "\n".join(lines)


def _short_names(modules: list[str]) -> dict[str, str]:
  """Drops the path prefix every module shares ('bert/encoder/layer/') to keep labels short."""
  if len(modules) < 2:
    return {m: m for m in modules}
  prefix = os.path.commonprefix([m + SEP for m in modules])
  prefix = prefix[:prefix.rfind(SEP) + 1]
  return {m: m[len(prefix):] or m for m in modules}


def _bar_plot(ranks, stored, names, path_png):
  # Figure + Agg canvas directly: no pyplot global state, no backend switch in a notebook.
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  modules = list(ranks)
  # Colour by projection kind: the label without its block index ('attention/self/query').
  kinds = [SEP.join(p for p in names[m].split(SEP) if not p.isdigit()) or names[m] for m in modules]
  palette = {k: f"C{i % 10}" for i, k in enumerate(dict.fromkeys(kinds))}
  fig = Figure(figsize=(max(6.0, 0.28 * len(modules) + 5.0), 4.5))
  FigureCanvasAgg(fig)
  ax = fig.add_subplot(1, 1, 1)
  x = np.arange(len(modules))
  ax.bar(x, [stored[m] for m in modules], color="0.88", label="stored r0")
  for kind in palette:
    idx = [i for i, k in enumerate(kinds) if k == kind]
    ax.bar(x[idx], [ranks[modules[i]] for i in idx], color=palette[kind], label=kind)
  mean = sum(ranks.values()) / len(ranks)
  ax.axhline(mean, color="k", linestyle="--", linewidth=1, label=f"mean live {mean:.2f}")
  ax.set_xticks(x)
  ax.set_xticklabels([names[m] for m in modules], rotation=90, fontsize=6)
  ax.set_ylabel("live rank")
  ax.set_title("DynDoRA rank allocation per adapted kernel")
  ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: bars reach r0
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path_png)), exist_ok=True)
  fig.savefig(path_png, dpi=120)
