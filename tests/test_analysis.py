"""Weight-decomposition analysis: constructed weights with known magnitude and direction changes,
the adapters' own math, and ΔM/ΔD/τ read back from a real (tiny) training run's checkpoints."""

import csv

import jax
import numpy as np
import pytest

import doran_jax as dj
from configs import tiny
from doran_jax import analysis, evaluate, experiment
from doran_jax import run as run_lib
from doran_jax.targets import Target


def _orthonormal_partner(rng, c):
  """A unit vector orthogonal to c."""
  u = rng.normal(size=c.shape)
  u -= (u @ c) / (c @ c) * c
  return u / np.linalg.norm(u)


def test_scaling_columns_changes_magnitude_only():
  rng = np.random.default_rng(0)
  w0 = rng.normal(size=(16, 6))
  factors = np.array([1.0, 2.0, 0.5, 1.5, 1.0, 3.0])
  dm, dd = analysis.magnitude_direction_change(w0, w0 * factors)
  expected = np.mean(np.abs(factors - 1) * np.linalg.norm(w0, axis=0))
  assert dm == pytest.approx(expected, rel=1e-12)
  assert dd == pytest.approx(0.0, abs=1e-12)


def test_rotating_columns_changes_direction_only():
  rng = np.random.default_rng(1)
  w0 = rng.normal(size=(12, 5))
  thetas = np.array([0.0, 0.1, 0.5, 1.2, np.pi / 2])
  w1 = np.stack([np.cos(t) * c + np.sin(t) * np.linalg.norm(c) * _orthonormal_partner(rng, c)
                 for t, c in zip(thetas, w0.T)], axis=1)
  dm, dd = analysis.magnitude_direction_change(w0, w1)
  assert dm == pytest.approx(0.0, abs=1e-12)
  assert dd == pytest.approx(np.mean(1 - np.cos(thetas)), rel=1e-12)


def test_scale_and_rotation_together_and_zero_columns():
  rng = np.random.default_rng(2)
  w0 = rng.normal(size=(8, 3))
  theta, k = 0.4, 1.7
  w1 = np.stack([k * (np.cos(theta) * c + np.sin(theta) * np.linalg.norm(c)
                      * _orthonormal_partner(rng, c)) for c in w0.T], axis=1)
  dm, dd = analysis.magnitude_direction_change(w0, w1)
  assert dm == pytest.approx((k - 1) * np.linalg.norm(w0, axis=0).mean(), rel=1e-12)
  assert dd == pytest.approx(1 - np.cos(theta), rel=1e-12)
  # A column that is zero in W0 (real checkpoints have some) has no direction: cos counts as 0.
  w0[:, 0] = 0.0
  dm, dd = analysis.magnitude_direction_change(w0, w0)
  assert np.isfinite(dm) and np.isfinite(dd)
  assert dm == 0.0 and dd == pytest.approx(1 / 3)
  with pytest.raises(ValueError, match="one shape"):
    analysis.magnitude_direction_change(w0, w0[:, :2])


def test_rows_respect_transposed_layout():
  rng = np.random.default_rng(3)
  w0 = rng.normal(size=(5, 8))          # stored (out=5, in=8), like GPT-2's Conv1D
  scale_out = np.linspace(1.0, 2.0, 5)[:, None]
  t = Target("h/0/attn/c_attn/kernel", "h/0/attn/c_attn", d_in=8, d_out=5, transposed=True, block=0)
  base = {"h": {"0": {"attn": {"c_attn": {"kernel": w0}}}}}
  tuned = {"h": {"0": {"attn": {"c_attn": {"kernel": w0 * scale_out}}}}}
  (row,) = analysis.decomposition_rows(base, tuned, [t], method="x", step=3)
  assert row["delta_d"] == pytest.approx(0.0, abs=1e-12)   # rows of the stored kernel are units
  assert row["delta_m"] == pytest.approx(np.mean((scale_out[:, 0] - 1) * np.linalg.norm(w0, axis=1)))
  assert (row["method"], row["step"], row["kind"], row["block"]) == ("x", 3, "c_attn", 0)
  # Read as (in, out) instead, the same change would look like a direction change.
  t_wrong = Target(t.path, t.module_path, d_in=5, d_out=8, transposed=False, block=0)
  (wrong,) = analysis.decomposition_rows(base, tuned, [t_wrong])
  assert wrong["delta_d"] > 1e-3


def test_correlation_sign_and_degenerate_cases():
  rows = [{"delta_m": m, "delta_d": 2 * m + 1} for m in (0.1, 0.2, 0.4)]
  assert analysis.correlation(rows) == pytest.approx(1.0)
  rows = [{"delta_m": m, "delta_d": -m} for m in (0.1, 0.2, 0.4)]
  assert analysis.correlation(rows) == pytest.approx(-1.0)
  assert np.isnan(analysis.correlation(rows[:1]))
  assert np.isnan(analysis.correlation([{"delta_m": 1.0, "delta_d": d} for d in (0.1, 0.2)]))


def _one_kernel(rng, d_in=16, d_out=12, rank=None):
  w0 = rng.normal(size=(d_in, d_out)).astype(np.float32)
  if rank is not None:  # a rank-limited W0 = U·Vᵀ
    u, v = rng.normal(size=(d_in, rank)), rng.normal(size=(rank, d_out))
    w0 = (u @ v / np.sqrt(d_in)).astype(np.float32)
  params = {"enc": {"query": {"kernel": w0}}}
  return w0, params


def test_lora_along_w0_only_scales_magnitude():
  rng = np.random.default_rng(4)
  rank, k = 4, 0.3
  w0, params = _one_kernel(rng, rank=rank)
  cfg = dj.AdapterConfig(method="lora", rank=rank, alpha=8.0, targets=r"enc/query/kernel")
  adapters = dj.init_adapters(jax.random.key(0), params, cfg)
  # s·A·B = k·W0 exactly when W0 has rank r: A = an orthonormal basis of W0's column space.
  q, _ = np.linalg.qr(w0)
  a = q[:, :rank]
  adapters["targets"]["enc"]["query"]["lora_a"] = a
  adapters["targets"]["enc"]["query"]["lora_b"] = (k / cfg.scale) * a.T @ w0
  merged = dj.apply_adapters(params, adapters, cfg, train=False)
  targets = dj.targets_for(params, cfg)
  (row,) = analysis.decomposition_rows(params, merged, targets)
  assert row["delta_d"] == pytest.approx(0.0, abs=1e-6)
  assert row["delta_m"] == pytest.approx(k * np.linalg.norm(w0, axis=0).mean(), rel=1e-4)


def test_dora_decouples_magnitude_from_direction():
  rng = np.random.default_rng(5)
  w0, params = _one_kernel(rng)
  cfg = dj.AdapterConfig(method="dora", rank=4, alpha=8.0, targets=r"enc/query/kernel")
  targets = dj.targets_for(params, cfg)
  adapters = dj.init_adapters(jax.random.key(0), params, cfg)
  leaves = adapters["targets"]["enc"]["query"]
  # Direction only: B ≠ 0 with m at its init ‖W0‖ leaves every column norm where it was.
  leaves["lora_b"] = rng.normal(size=leaves["lora_b"].shape).astype(np.float32)
  v = w0.astype(np.float64) + cfg.scale * np.asarray(leaves["lora_a"], np.float64) @ leaves["lora_b"]
  cos = np.sum(v * w0, 0) / (np.linalg.norm(v, axis=0) * np.linalg.norm(w0, axis=0))
  (row,) = analysis.decomposition_rows(params, dj.apply_adapters(params, adapters, cfg), targets)
  assert row["delta_m"] == pytest.approx(0.0, abs=1e-5)
  assert row["delta_d"] == pytest.approx(np.mean(1 - cos), rel=1e-4) and row["delta_d"] > 1e-2
  # Magnitude only: B = 0 and m scaled per column.
  factors = np.linspace(0.5, 1.5, w0.shape[1]).astype(np.float32)
  leaves["lora_b"] = np.zeros_like(leaves["lora_b"])
  leaves["magnitude"] = np.linalg.norm(w0, axis=0) * factors
  (row,) = analysis.decomposition_rows(params, dj.apply_adapters(params, adapters, cfg), targets)
  assert row["delta_d"] == pytest.approx(0.0, abs=1e-6)
  assert row["delta_m"] == pytest.approx(
      np.mean(np.abs(factors - 1) * np.linalg.norm(w0, axis=0)), rel=1e-4)


def _tiny(shared_data, workdir, method, steps):
  c = tiny.get_config(f"kind=text,method={method}")
  with c.unlocked():
    c.workdir = str(workdir)
    c.data.path = str(shared_data / "text" / "sst2")
    c.num_steps = steps
    c.checkpoint.every = 1
    c.checkpoint.max_to_keep = 100
    c.optim.lr = 1e-2
  return c


@pytest.mark.parametrize("method", ["doran", "full"])
def test_checkpoint_decomposition_reads_every_checkpoint(shared_data, tmp_path, method):
  c = _tiny(shared_data, tmp_path, method, steps=3)
  run = run_lib.setup(c)
  targets = analysis._adapted_targets(run)
  assert len(targets) == 4   # query and value of the tiny BERT's 2 blocks
  base = analysis.target_weights(
      evaluate.merged_params(run.frozen, run.state.trainable, run.adapter_cfg), targets)
  final_state = experiment.train(c, str(tmp_path), run=run)["state"]
  rows, taus = analysis.checkpoint_decomposition(run, str(tmp_path), base, method=method)
  assert sorted({r["step"] for r in rows}) == [1, 2, 3]
  assert len(rows) == 3 * len(targets) and all(r["method"] == method for r in rows)
  # The last checkpoint is the final state: its rows equal those from the live run.
  final = analysis.decomposition_rows(
      base, evaluate.merged_params(run.frozen, final_state.trainable, run.adapter_cfg), targets)
  last = [r for r in rows if r["step"] == 3]
  np.testing.assert_allclose([r["delta_m"] for r in last], [r["delta_m"] for r in final], rtol=1e-6)
  np.testing.assert_allclose([r["delta_d"] for r in last], [r["delta_d"] for r in final], rtol=1e-6)
  assert all(r["delta_d"] > 0 and r["delta_m"] > 0 for r in last)   # training moved the weights
  summary = analysis.decomposition_summary(rows)
  assert summary["final_step"] == 3 and summary["points"] == len(rows)
  assert summary["final_delta_m"] == pytest.approx(np.mean([r["delta_m"] for r in final]))
  assert summary["final_delta_d"] == pytest.approx(np.mean([r["delta_d"] for r in final]))
  np.testing.assert_equal(summary["corr"], analysis.correlation(rows))
  if method == "doran":
    assert len(taus) == 3 * len(targets)
    live = analysis.tau_values(jax.device_get(final_state.trainable["adapters"]))
    assert {r["layer"] for r in taus} == set(live) == {t.module_path for t in targets}
    for r in taus:
      if r["step"] == 3:
        assert r["tau"] == pytest.approx(float(live[r["layer"]]), rel=1e-6)
    # τ is trained: the first update (step 2, after the warm-up step at lr 0) moves it off its init.
    assert all(abs(r["tau"] - run.adapter_cfg.tau_init) > 1e-6 for r in taus if r["step"] == 3)
  else:
    assert taus == []


def test_csv_and_plots(tmp_path):
  rows = [{"method": "lora", "step": s, "layer": f"l/{b}/query", "block": b, "kind": "query",
           "delta_m": 0.1 * b + 0.01 * s, "delta_d": 0.01 * b} for b in range(3) for s in (1, 2)]
  path = tmp_path / "rows.csv"
  analysis.write_csv(rows, str(path))
  with open(path) as f:
    back = list(csv.DictReader(f))
  assert [float(r["delta_m"]) for r in back] == [r["delta_m"] for r in rows]
  png = tmp_path / "fig.png"
  analysis.plot_decomposition({"lora": rows, "dora": rows}, str(png), title="t")
  assert png.stat().st_size > 5000 and png.read_bytes()[:4] == b"\x89PNG"
  hist = [{"step": i + 1, "loss": 2.0 / (i + 1)} for i in range(10)]
  taus = [{"step": s, "layer": "l/0/query", "tau": 0.01 * s} for s in (1, 2)]
  png2 = tmp_path / "train.png"
  analysis.plot_training({"lora": hist}, taus, str(png2))
  assert png2.read_bytes()[:4] == b"\x89PNG"


def test_at_chance_is_a_constant_predictions_score_unless_mcc_shows_learning():
  assert analysis.at_chance(0.52, 0.50) and not analysis.at_chance(0.56, 0.50)
  assert analysis.at_chance(0.69, 0.686, mcc=0.0)          # CoLA, majority class everywhere
  assert analysis.at_chance(0.69, 0.686, mcc=0.08)         # below 2 x margin
  assert not analysis.at_chance(0.70, 0.686, mcc=0.17)     # CoLA: accuracy barely moves, MCC does
  assert analysis.at_chance(0.70, 0.686, mcc=float("nan"))  # no MCC: the accuracy rule alone
  assert analysis.at_chance(0.70, 0.686, mcc=0.17, margin=1.0)


def test_aggregate_counts_nan_and_chance_runs():
  rows = [
      {"method": "lora", "lr": 1e-3, "status": "ok", "accuracy": 0.80},
      {"method": "lora", "lr": 1e-3, "status": "ok", "accuracy": 0.84},
      {"method": "lora", "lr": 3e-2, "status": "nan", "accuracy": float("nan")},
      {"method": "lora", "lr": 3e-2, "status": "chance", "accuracy": 0.50},
      {"method": "dora", "lr": 1e-3, "status": "nan", "accuracy": float("nan")},
  ]
  agg = analysis.aggregate(rows, ("method", "lr"))
  assert [(a["method"], a["lr"]) for a in agg] == [("lora", 1e-3), ("lora", 3e-2), ("dora", 1e-3)]
  first, second, third = agg
  assert first["mean"] == pytest.approx(0.82) and first["std"] == pytest.approx(np.std([0.8, 0.84], ddof=1))
  assert (first["runs"], first["failed"]) == (2, 0)
  assert second["mean"] == pytest.approx(0.5) and second["std"] == 0.0   # NaN runs have no model
  assert (second["nan"], second["chance"], second["failed"], second["runs"]) == (1, 1, 2, 2)
  assert np.isnan(third["mean"]) and third["failed"] == 1
  table = analysis.markdown_grid(agg, "lr", "method", row_label="learning rate")
  lines = table.splitlines()
  assert lines[0] == "| learning rate | lora | dora |"
  assert lines[2] == "| 0.001 | 0.820 ± 0.028 (0/2 at chance) | — (0/1 at chance, 1 NaN) |"
  assert lines[3] == "| 0.03 | 0.500 (1 run) (1/2 at chance, 1 NaN) |  |"


def test_study_csv_round_trip_and_plot(tmp_path):
  rows = [{"method": m, "lr": lr, "seed": s, "status": "ok", "accuracy": 0.5 + 0.1 * s + lr,
           "requested_limit": "all"} for m in ("lora", "dora") for lr in (1e-4, 1e-2) for s in (0, 1)]
  path = tmp_path / "runs.csv"
  analysis.write_csv(rows, str(path), ("method", "lr", "seed", "status", "accuracy"))
  back = analysis.read_csv(str(path))
  assert back == rows
  png = tmp_path / "study.png"
  analysis.plot_study(analysis.aggregate(back, ("lr", "method")), "lr", "method", str(png),
                      xlabel="lr", ylabel="accuracy", chance=0.5)
  assert png.read_bytes()[:4] == b"\x89PNG"


def test_train_and_score_turns_divergence_into_a_row(shared_data, tmp_path):
  # lr 1e30 overflows the weights after the first real update: a NaN stop, reported as a row.
  c = _tiny(shared_data, tmp_path / "w", "lora", steps=4)
  with c.unlocked():
    c.optim.lr = 1e30
  row = analysis.train_and_score(c, str(tmp_path / "w"))
  assert row["status"] == "nan" and np.isnan(row["accuracy"]) and "non-finite update norm" in row["error"]
  assert not (tmp_path / "w").exists()   # scratch workdir removed
  c = _tiny(shared_data, tmp_path / "w", "lora", steps=2)
  row = analysis.train_and_score(c, str(tmp_path / "w"), chance_margin=1.0)
  assert row["status"] == "chance" and 0.0 <= row["accuracy"] <= 1.0   # everything is 'chance'
  assert row["train_examples"] == row["limit"] == 64 and row["eval_examples"] == 32
  assert row["majority_accuracy"] > 0.4 and np.isfinite(row["final_loss"])


def test_mean_std_text_gives_no_spread_for_one_run():
  assert analysis.mean_std_text(0.8123, 0.0, 1) == "0.812 (1 run)"
  assert analysis.mean_std_text(0.8123, 0.0104, 3) == "0.812 ± 0.010"
  assert analysis.mean_std_text(float("nan"), float("nan"), 0) == "—"
