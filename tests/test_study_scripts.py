"""The lr sweep and the two studies at smoke scale (real MiniLM, a few steps, tiny subsets), and
the stability measures they report (loss spikes, gradient-norm variance) on hand-made histories."""

import argparse

import numpy as np
import pytest

from configs import sst2
from doran_jax import analysis
from scripts import grid, lr_sweep, study_commonsense_llm, study_doran_ablation, study_dyndora_cola


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


def test_epochs_win_over_a_scripts_default_step_count():
  # study_doran_ablation defaults --steps to 60: '--epochs 2' alone must train 2 epochs, not 60
  # steps (it silently did).
  p = argparse.ArgumentParser()
  grid.add_flags(p, config="", lrs="1e-3", seeds="0", steps=60, limit=0, eval_limit=0, name="x")
  variant = grid.Variant("lora", "lora")
  args = p.parse_args(["--epochs", "2"])
  config = grid.point_config(sst2, variant, 1e-3, 0, args)
  assert config.num_epochs == 2.0 and config.num_steps == 0
  assert "2 epochs" in grid.settings_line(args, "sst2.py")
  config = grid.point_config(sst2, variant, 1e-3, 0, p.parse_args([]))
  assert config.num_steps == 60 and "60 steps" in grid.settings_line(p.parse_args([]), "sst2.py")


def test_rank_report_comes_from_the_lowest_seed_still_on_disk(tmp_path):
  rows = [{"variant": "dyndora", "lr": 1e-3, "seed": s} for s in (4, 3, 0)] + \
         [{"variant": "dyndora", "lr": 3e-3, "seed": 1}]
  best = {"variant": "dyndora", "best_lr": 1e-3}
  assert study_dyndora_cola.rank_source(best, rows, str(tmp_path)) is None
  for seed in (3, 4):
    for ext in (".png", ".md"):
      (tmp_path / f"dyndora_lr0.001_seed{seed}{ext}").write_text("x")
  assert study_dyndora_cola.rank_source(best, rows, str(tmp_path)) == (
      3, str(tmp_path / "dyndora_lr0.001_seed3"))
  for ext in (".png", ".md"):
    (tmp_path / f"dyndora_lr0.001_seed0{ext}").write_text("x")
  assert study_dyndora_cola.rank_source(best, rows, str(tmp_path))[0] == 0


def test_best_lr_per_variant_is_the_highest_mean():
  rows = [{"variant": "a", "method": "lora", "lr": lr, "seed": s, "status": "ok", "mcc": m,
           "loss_spikes": k, "grad_norm_var": 0.1}
          for lr, s, m, k in [(1e-3, 0, 0.2, 0), (1e-3, 1, 0.4, 2), (3e-3, 0, 0.5, 1), (3e-3, 1, 0.0, 1)]]
  (best,) = grid.best_by_variant(rows, "mcc", ["a"])
  assert best["best_lr"] == 1e-3 and best["mean"] == pytest.approx(0.3)
  assert best["spread"] == pytest.approx(0.2) and best["loss_spikes"] == pytest.approx(1.0)
  assert best["grid"] == {1e-3: pytest.approx(0.3), 3e-3: pytest.approx(0.25)}


def test_tune_seeds_pick_the_lr_then_the_other_seeds_run_only_there(monkeypatch, tmp_path):
  """--tune-seeds 0: the whole grid on seed 0, then seeds 1, 2 at each variant's best lr over
  seed 0 alone, even where the extra seeds pull that lr's mean below another lr's."""
  score = {("a", 1e-3, 0): 0.5, ("a", 3e-3, 0): 0.4, ("a", 1e-3, 1): 0.1, ("a", 1e-3, 2): 0.2,
           ("b", 1e-3, 0): 0.1, ("b", 3e-3, 0): 0.3, ("b", 3e-3, 1): 0.3, ("b", 3e-3, 2): 0.4}
  calls = []

  def fake_run_points(todo, args, csv_path, *, inspect=None, resume=None):
    calls.append(([(v.name, lr, s) for v, lr, s in todo], resume))
    done = [] if not resume else [r for c in calls[:-1] for r in c[2]]
    new = [{"variant": v.name, "method": v.method, "lr": lr, "seed": s, "status": "ok",
            "mcc": score[(v.name, lr, s)], "loss_spikes": 0, "grad_norm_var": 0.0}
           for v, lr, s in todo]
    calls[-1] += (new,)
    return done + new

  monkeypatch.setattr(grid, "run_points", fake_run_points)
  args = grid.argparse.Namespace(lrs="1e-3,3e-3", seeds="0,1,2", tune_seeds="0", report_only=False)
  variants = [grid.Variant("a", "lora"), grid.Variant("b", "dora")]
  rows = grid.run_grid(variants, args, str(tmp_path / "x.csv"), "mcc")
  assert calls[0][0] == [("a", 1e-3, 0), ("a", 3e-3, 0), ("b", 1e-3, 0), ("b", 3e-3, 0)]
  assert calls[1][0] == [("a", 1e-3, 1), ("a", 1e-3, 2), ("b", 3e-3, 1), ("b", 3e-3, 2)]
  assert calls[1][1] is True and len(rows) == 8
  best = {b["variant"]: b for b in grid.best_by_variant(rows, "mcc", ["a", "b"], tune_seeds=[0])}
  # a: 1e-3 won on seed 0 (0.5 > 0.4) and stays chosen at a 3-seed mean of 0.267 < 0.4.
  assert best["a"]["best_lr"] == 1e-3 and best["a"]["mean"] == pytest.approx(0.8 / 3)
  assert best["a"]["runs"] == 3 and best["a"]["grid_runs"] == {1e-3: 3, 3e-3: 1}
  assert best["b"]["best_lr"] == 3e-3 and best["b"]["spread"] == pytest.approx(0.1)
  # Without tune_seeds the mean over every seed decides, and 'a' would move to 3e-3.
  assert {b["variant"]: b["best_lr"] for b in grid.best_by_variant(rows, "mcc", ["a", "b"])} == {
      "a": 3e-3, "b": 3e-3}
  table = grid.markdown_best(list(best.values()), "mcc")
  assert "0.001: 0.267 (3), 0.003: 0.400 (1)" in table
  # The grid column reads in lr order whatever order the points ran in (--resume adds lrs late).
  late = [r for r in rows if r["lr"] == 3e-3] + [r for r in rows if r["lr"] == 1e-3]
  (b_late,) = [b for b in grid.best_by_variant(late, "mcc", ["b"], tune_seeds=[0])]
  assert "| 0.001: 0.100 (1), 0.003: 0.333 (3) |" in grid.markdown_best([b_late], "mcc")
  with pytest.raises(ValueError, match="must be among --seeds"):
    grid.tune_seeds(grid.argparse.Namespace(seeds="0,1", tune_seeds="5"))


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


def _cs_row(variant, lr, seed, phase, mc, gen=float("nan"), status="ok"):
  row = {"phase": phase, "variant": variant, "method": variant, "rank": 16, "targets": "q,v",
         "lr": lr, "seed": seed, "steps": 40 if phase == "grid" else 80, "status": status,
         "eval_per_task": 10, "scoring": "mc" if phase == "grid" else "mc+gen", "wall_s": 60.0,
         "train_limit": 1000, "batch": 4, "max_length": 256, "model": "smollm2",
         "mc_avg": mc, "gen_avg": gen, "loss_spikes": 0, "grad_norm_var": 0.1, "train_minutes": 1.0,
         "adapter_params": 10, "adapter_params_stored": 10}
  for t in study_commonsense_llm.TASKS:
    row[f"mc_{t}"], row[f"gen_{t}"] = mc, gen
  return row


def test_commonsense_best_lr_report_and_welch():
  """The lr comes from the seed-0 grid (a NaN run never wins); the table reads mean ± std over
  the final seeds; differences carry Welch's t."""
  cs = study_commonsense_llm
  rows = [_cs_row("lora", 1e-3, 0, "grid", 0.50), _cs_row("lora", 3e-3, 0, "grid", 0.60),
          _cs_row("dora", 1e-3, 0, "grid", 0.55),
          _cs_row("dora", 3e-3, 0, "grid", float("nan"), status="nan")]
  assert cs.best_lrs(rows) == {"lora": 3e-3, "dora": 1e-3}
  rows += [_cs_row("lora", 3e-3, s, "final", m, g)
           for s, m, g in [(0, .50, .30), (1, .52, .32), (2, .54, .34)]]
  rows += [_cs_row("dora", 1e-3, s, "final", m, g)
           for s, m, g in [(0, .60, .20), (1, .62, .22), (2, .64, .24)]]
  w = cs.welch([.60, .62, .64], [.50, .52, .54])
  assert w["diff"] == pytest.approx(0.10) and w["t"] == pytest.approx(0.10 / np.sqrt(2 * 0.0004 / 3))
  assert w["df"] == pytest.approx(4.0)
  text = cs.report(rows)
  assert "| lora (r16, q,v) | 0.003 | 3 | 52.0 ± 2.0 |" in text
  assert "| dora − lora | multiple choice | 10.0 | 1.6 | 6.12 | 4.0 | 3 vs 3 |" in text
  assert "**the two scorings rank the methods differently**" in text
  assert "0.001 (0.001: 55.0, 0.003: NaN)" in text     # dora's grid, its NaN run shown as such
  assert "[docs/studies.md](../studies.md)" in text and "to be written" not in text


def _write_suite(root, answers_by_task):
  """A commonsense folder whose test.json of each task holds records with the given answers."""
  import json
  for task, answers in answers_by_task.items():
    words = sorted(set(answers) | {"x_other"}) if task != "boolq" else ["true", "false"]
    records = [{"instruction": f"Q{i}?\n\nAnswer format: {'/'.join(words)}", "input": "",
                "output": f"the correct answer is {a}", "answer": a} for i, a in enumerate(answers)]
    (root / task).mkdir(parents=True)
    (root / task / "test.json").write_text(json.dumps(records))


def test_commonsense_constant_answer_table(tmp_path):
  """answer_counts reads the scored rows (the first N, every offered word counted, also at 0); a
  run's per-task score is marked where one answer word given to every question scores the same,
  and the best constant per task is its own row."""
  cs = study_commonsense_llm
  answers = {t: ["a1", "a2", "a2", "a1", "a2"] for t in cs.TASKS}
  answers["boolq"] = ["true", "true", "true", "false", "true", "false"]   # the 6th is not scored
  _write_suite(tmp_path, answers)
  counts = cs.answer_counts(str(tmp_path), 5)
  assert counts["boolq"] == {"false": 1, "true": 4}
  assert counts["piqa"] == {"a1": 2, "a2": 3, "x_other": 0}
  row = _cs_row("lora", 1e-3, 0, "final", 0.6, 0.4)   # 3 of 5 right = always a2
  row["eval_per_task"] = 5
  row["mc_boolq"] = 0.8                                  # 4 of 5 = always true
  row["mc_piqa"] = 0.2                                   # 1 of 5: no constant scores that
  row["gen_boolq"] = 0.0                                 # 0 of 5: every word is right at least once
  text = cs.report([row], counts)
  line = next(l for l in text.splitlines() if l.startswith("| lora seed 0 |"))
  assert "| 80.0 = true | 20.0 | 60.0 = a2 |" in line
  assert line.endswith("| 6/7 (6/7) |")    # gen: 40% = 2 of 5 = always a1, except boolq's 0 of 5
  best = next(l for l in text.splitlines() if l.startswith("| best constant answer"))
  assert "| 80.0 = true | 60.0 = a2 |" in best
  assert "1 of 1 final runs score, by multiple choice, exactly what one constant" in text
  assert "Constant answers" not in cs.report([row])       # no counts given: no section


def test_commonsense_answer_counts_on_the_real_suite(shared_data):
  counts = study_commonsense_llm.answer_counts(str(shared_data / "commonsense"), 30)
  assert set(counts) == set(study_commonsense_llm.TASKS)
  assert all(sum(c.values()) == 30 for c in counts.values())
  assert set(counts["social_i_qa"]) == {"answer1", "answer2", "answer3"}


@pytest.mark.slow  # tiny random LLaMA: ~30-60 s on 2 loaded cores
def test_commonsense_llm_smoke_resume_and_report_only(tmp_path, monkeypatch):
  import time
  from doran_jax import run as run_lib
  from doran_jax import trainer
  cs = study_commonsense_llm
  argv = ["--smoke", "--out", str(tmp_path / "out"), "--runs", str(tmp_path / "runs")]
  cs.main(argv)
  out = tmp_path / "out"
  rows = analysis.read_csv(str(out / "commonsense_llm.csv"))
  # lora and dora: the seed-0 grid run is also the seed-0 final run (same settings), then seed 1.
  assert [(r["phase"], r["variant"], r["seed"]) for r in rows] == [
      ("zero_shot", "zero_shot", ""), ("grid+final", "lora", 0), ("grid+final", "dora", 0),
      ("final", "lora", 1), ("final", "dora", 1)]
  numeric = [f"mc_{t}" for t in cs.TASKS] + ["mc_avg", "gen_avg"] + [f"gen_{t}" for t in cs.TASKS]
  assert all(np.isfinite(float(r[k])) for r in rows for k in numeric + ["wall_s"])
  assert all(np.isfinite(float(r[k])) and r["status"] == "ok" for r in rows[1:]
             for k in ("loss_spikes", "grad_norm_var", "train_minutes", "final_loss"))
  assert {r["rank"] for r in rows[1:]} == {4} and rows[1]["steps"] == 2
  text = (out / "commonsense_llm.md").read_text()
  assert "| zero-shot (base model) |" in text and "| dora − lora | multiple choice |" in text
  assert "| best constant answer per task" in text and "| lora seed 1 |" in text   # data found
  assert (out / "commonsense_llm.png").stat().st_size > 1000
  # --resume trains and loads nothing: every run is complete in its workdir.
  def refuse(*a, **k):
    raise AssertionError("--resume retrained a finished run")
  monkeypatch.setattr(trainer, "fit", refuse)
  monkeypatch.setattr(run_lib, "setup", refuse)
  t0 = time.time()
  cs.main(argv + ["--resume"])
  assert time.time() - t0 < 20
  assert analysis.read_csv(str(out / "commonsense_llm.csv")) == rows
  assert (out / "commonsense_llm.md").read_text() == text
  # --report-only rewrites the same markdown from the CSV alone.
  (out / "commonsense_llm.md").unlink()
  cs.main(argv + ["--report-only"])
  assert (out / "commonsense_llm.md").read_text() == text
  with pytest.raises(SystemExit, match="--resume"):   # no silent restart over finished runs
    cs.main(argv)
  # --reproduce: one cell rerun from scratch elsewhere gives its recorded row again.
  monkeypatch.undo()
  recorded = _snapshot_tree(tmp_path / "runs" / "lora")
  assert cs.main(argv + ["--reproduce", "lora,0.001,1,final"]) == 0
  assert _snapshot_tree(tmp_path / "runs" / "lora") == recorded     # the recorded run untouched
  assert len(list((tmp_path / "runs" / "reproduce").glob("*/lora/*/results.json"))) == 1
  with pytest.raises(SystemExit, match="no such recorded cell; the CSV holds lora,0.001,0,final"):
    cs.main(argv + ["--reproduce", "lora,0.003,1,final"])


def _snapshot_tree(root):
  return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_commonsense_reproduce_names_every_field_that_differs():
  cs = study_commonsense_llm
  row = _cs_row("dora", 1e-3, 1, "final", 0.50, 0.30)
  row.update(final_loss=0.25, grad_norm_var=0.1, loss_spikes=0)
  assert cs.compare_rows(row, dict(row)) == []
  near = {**row, "final_loss": 0.25 * (1 + 1e-8)}          # float32 rounding of a logged value
  assert cs.compare_rows(row, near) == []
  off = {**row, "mc_avg": 0.51, "gen_boolq": float("nan"), "final_loss": 0.26, "status": "nan"}
  diffs = cs.compare_rows(row, off)
  assert [d.split(":")[0] for d in diffs] == ["mc_avg", "gen_boolq", "status", "final_loss"]
