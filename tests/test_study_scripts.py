"""The lr sweep and the two studies at smoke scale (real MiniLM, a few steps, tiny subsets), and
the stability measures they report (loss spikes, gradient-norm variance) on hand-made histories."""

import numpy as np
import pytest

from doran_jax import analysis
from scripts import grid, lr_sweep, study_doran_ablation, study_dyndora_cola


def test_loss_spikes_against_a_hand_count():
  losses = [1.0] * 20 + [2.5, 1.0, 1.9, 3.0] + [0.5] * 30 + [1.2]
  # t=20: 2.5 > 2·1 (spike); t=22: 1.9 no; t=23: 3.0 > 2 (spike); the last 1.2 > 2·0.5 (spike).
  assert analysis.loss_spikes(losses) == 3
  assert analysis.loss_spikes(losses, factor=2.6) == 1
  assert analysis.loss_spikes(losses[:20]) == 0      # nothing before a full window
  history = [{"loss": l, "grad_norm": g} for l, g in zip(losses, np.linspace(1, 3, len(losses)))]
  stats = analysis.stability_stats(history)
  assert stats["loss_spikes"] == 3
  assert stats["grad_norm_var"] == pytest.approx(np.var(np.linspace(1, 3, len(losses))))


def test_best_lr_per_variant_is_the_highest_mean():
  rows = [{"variant": "a", "method": "lora", "lr": lr, "seed": s, "status": "ok", "mcc": m,
           "loss_spikes": k, "grad_norm_var": 0.1}
          for lr, s, m, k in [(1e-3, 0, 0.2, 0), (1e-3, 1, 0.4, 2), (3e-3, 0, 0.5, 1), (3e-3, 1, 0.0, 1)]]
  (best,) = grid.best_by_variant(rows, "mcc", ["a"])
  assert best["best_lr"] == 1e-3 and best["mean"] == pytest.approx(0.3)
  assert best["spread"] == pytest.approx(0.2) and best["loss_spikes"] == pytest.approx(1.0)
  assert best["grid"] == {1e-3: pytest.approx(0.3), 3e-3: pytest.approx(0.25)}


def _common(tmp_path):
  return ["--out", str(tmp_path / "out"), "--runs", str(tmp_path / "runs"), "--steps", "2",
          "--limit", "16", "--eval-limit", "16", "--max-length", "16", "--batch", "8"]


@pytest.mark.slow  # real MiniLM: 20-40 s idle, 1.5-2.5 min on a loaded machine
def test_lr_sweep_smoke_writes_csv_and_the_lr_table(tmp_path):
  lr_sweep.main(["--methods", "lora", "--lrs", "1e-3,1e-2", "--seeds", "0"] + _common(tmp_path))
  rows = analysis.read_csv(str(tmp_path / "out" / "lr_sweep_sst2.csv"))
  assert [(r["method"], r["lr"]) for r in rows] == [("lora", 1e-3), ("lora", 1e-2)]
  assert all(r["steps"] == 2 and r["train_examples"] == 16 for r in rows)
  text = (tmp_path / "out" / "lr_sweep_sst2.md").read_text()
  best = max(rows, key=lambda r: r["accuracy"])["lr"]
  assert f'LR = {{"lora": {best:g}}}' in text
  # --report-only trains nothing, even for points the CSV lacks, and rewrites the tables.
  (tmp_path / "out" / "lr_sweep_sst2.md").unlink()
  lr_sweep.main(["--methods", "lora", "--lrs", "1e-3,1e-2,3e-2", "--seeds", "0,1", "--report-only"]
                + _common(tmp_path))
  assert analysis.read_csv(str(tmp_path / "out" / "lr_sweep_sst2.csv")) == rows
  assert f'LR = {{"lora": {best:g}}}' in (tmp_path / "out" / "lr_sweep_sst2.md").read_text()
  with pytest.raises(FileNotFoundError, match="run the grid first"):
    lr_sweep.main(["--report-only", "--name", "never_run"] + _common(tmp_path))


@pytest.mark.slow  # real MiniLM: 20-40 s idle, 1.5-2.5 min on a loaded machine
def test_doran_ablation_smoke(tmp_path):
  study_doran_ablation.main(["--tasks", "cola", "--variants", "dora_tau,doran_block",
                             "--lrs", "1e-3", "--seeds", "0", "--targets", "attention"]
                            + _common(tmp_path))
  rows = analysis.read_csv(str(tmp_path / "out" / "study_doran_ablation.csv"))
  assert [(r["task"], r["variant"], r["method"]) for r in rows] == [
      ("cola", "dora_tau", "doran"), ("cola", "doran_block", "doran")]
  assert all(np.isfinite(r["grad_norm_var"]) and r["loss_spikes"] == 0 for r in rows)
  text = (tmp_path / "out" / "study_doran_ablation.md").read_text()
  assert "| dora_tau | 0.001 |" in text and "### cola (eval mcc)" in text
  assert "Targets: attention." in text
  assert (tmp_path / "out" / "study_doran_ablation_cola.png").stat().st_size > 1000
  with pytest.raises(ValueError, match="unknown"):
    study_doran_ablation.main(["--variants", "dora_tau,nope"] + _common(tmp_path))


@pytest.mark.slow  # real MiniLM: 20-40 s idle, 1.5-2.5 min on a loaded machine
def test_dyndora_cola_smoke_reports_budget_and_rank_plot(tmp_path):
  study_dyndora_cola.main(["--variants", "lora,dyndora", "--lrs", "1e-3", "--seeds", "0",
                           "--rank", "2"] + _common(tmp_path))
  rows = {r["variant"]: r for r in analysis.read_csv(str(tmp_path / "out" / "study_dyndora_cola.csv"))}
  assert rows["lora"]["mean_rank"] == 2
  assert rows["dyndora"]["mean_rank"] == pytest.approx(2.0, abs=1 / 36)   # pruned to the budget
  assert rows["dyndora"]["adapter_params_stored"] < 1.5 * rows["lora"]["adapter_params_stored"]
  out = tmp_path / "out"
  assert (out / "study_dyndora_cola_ranks.png").stat().st_size > 1000
  assert (out / "study_dyndora_cola.png").stat().st_size > 1000
  assert "live ranks per adapted kernel" in (out / "study_dyndora_cola.md").read_text()
