"""Per-method learning rates, DynDoRA's official recipe as config defaults, warm-up ratio, and the
linear-probe baseline (toy data against scikit-free NumPy facts, then a tiny end-to-end run)."""

import re

import numpy as np
import pytest

import doran_jax as dj
from configs import cola, default, sst2, tiny
from doran_jax import config_lib, experiment, models, optim, probe
from doran_jax import run as run_lib
from doran_jax.adapters import method as method_registry
from doran_jax.adapters.dyndora import RECIPE
from doran_jax.targets import flatten
from doran_jax.trainable import split_params


@pytest.mark.parametrize("module", [sst2, cola, default])
def test_per_method_lr_table_is_used_unless_lr_is_given(module):
  table = module.LR
  assert {"lora", "dora", "doran", "dyndora", "frozen"} <= set(table)
  for method in ("lora", "doran", "frozen"):
    c = module.get_config(f"method={method}")
    assert c.optim.lr is None   # unset in the file: the table decides
    assert config_lib.resolved(c).optim.lr == table[method]
  # An explicit lr wins: the config argument, and a flag-style override after get_config.
  assert config_lib.resolved(module.get_config("method=lora,lr=3.5e-4")).optim.lr == 3.5e-4
  c = module.get_config("method=dora")
  c.optim.lr = 7e-5
  assert config_lib.resolved(c).optim.lr == 7e-5
  # The table follows the method even when it is switched after get_config (a flag).
  c = module.get_config("method=lora")
  c.adapter.method = "frozen"
  assert config_lib.resolved(c).optim.lr == table["frozen"]


def test_table_without_the_method_is_a_clear_error():
  c = sst2.get_config("method=lora")
  with c.unlocked():
    c.optim.lr_by_method = {"dora": 1e-3}
  with pytest.raises(ValueError, match="no entry for method 'lora'.*pass lr="):
    config_lib.resolved(c)
  with pytest.raises(ValueError, match="optim.lr is unset"):
    optim.learning_rate_schedule(c.optim, 10)


def test_run_setup_trains_at_the_table_lr(shared_data, tmp_path):
  c = tiny.get_config("kind=text,method=lora")
  with c.unlocked():
    c.data.path = str(shared_data / "text" / "sst2")
    c.optim.lr = None
    c.optim.lr_by_method = {"lora": 4e-3}
    c.optim.warmup_steps = 0
    c.optim.schedule = "constant"
  run = run_lib.setup(c)
  assert run.config.optim.lr == 4e-3 and c.optim.lr is None   # the caller's config is not changed
  assert float(run.schedule(0)) == pytest.approx(4e-3)


def test_dyndora_takes_the_official_recipe_unless_given():
  c = cola.get_config("method=dyndora")
  for path, value in RECIPE.items():
    section, key = path.split(".")
    assert c[section][key] == value, path
  c = cola.get_config("method=dyndora,alpha=16,mode=merged")
  assert c.adapter.alpha == 16.0 and c.adapter.mode == "merged" and c.optim.weight_decay == 0.01
  lora = cola.get_config("method=lora")
  assert lora.adapter.alpha == 16.0 and lora.optim.weight_decay == 0.0 and lora.adapter.dropout == 0.0
  assert lora.adapter.targets == "all_linear"    # cola adapts every block linear for all methods


def test_warmup_ratio_replaces_warmup_steps():
  c = cola.get_config("method=dyndora")
  assert optim.warmup_steps(c.optim, 1000) == 60 and optim.warmup_steps(c.optim, 10) == 0
  assert optim.warmup_steps(cola.get_config("method=lora").optim, 1000) == 60  # warmup_steps
  schedule = optim.learning_rate_schedule(config_lib.resolved(c).optim, 1000)
  assert float(schedule(30)) == pytest.approx(0.5e-3) and float(schedule(60)) == pytest.approx(1e-3)


def test_dyndora_recipe_runs_end_to_end_on_a_tiny_model(shared_data, tmp_path):
  c = tiny.get_config("kind=text,method=dyndora,method_recipe=True,steps=6")
  with c.unlocked():
    c.data.path = str(shared_data / "text" / "sst2")
    c.workdir = str(tmp_path)
  run = run_lib.setup(c)
  cfg = run.adapter_cfg
  assert (cfg.alpha, cfg.dropout, cfg.mode, cfg.init) == (8.0, 0.1, "factored", "official")
  assert cfg.targets == run.backbone.family.target_presets["all_linear"]
  assert len(dj.targets_for(run.frozen, cfg)) == 12    # 6 linears in each of the 2 blocks, no pooler
  out = experiment.train(c, str(tmp_path), run=run)
  assert out["status"] == "done" and all(np.isfinite(h["loss"]) for h in out["history"])


# --------------------------------------------------------------------------- linear probe

def test_logistic_probe_beats_majority_on_separable_data():
  rng = np.random.default_rng(0)
  n, d = 400, 16
  y = (rng.random(n) < 0.7).astype(np.int32)         # majority 0.7
  centres = rng.normal(size=(2, d)) * 3.0
  x = centres[y] + rng.normal(size=(n, d)) + 5.0      # an offset the standardisation removes
  fitted = probe.fit_logistic(x[:300], y[:300], 2)
  accuracy = float(np.mean(probe.predict_logistic(fitted, x[300:]) == y[300:]))
  majority = max(np.mean(y[300:]), 1 - np.mean(y[300:]))
  assert accuracy > 0.97 and accuracy > majority + 0.2
  # Three classes, and the fit has converged: the gradient of the regularised loss is ~0.
  y3 = rng.integers(0, 3, n)
  x3 = rng.normal(size=(3, d))[y3] * 2 + rng.normal(size=(n, d))
  f3 = probe.fit_logistic(x3, y3, 3, l2=1e-2)
  z = (x3 - np.asarray(f3["mean"])) / np.asarray(f3["std"])
  logits = z @ np.asarray(f3["w"], np.float64) + np.asarray(f3["b"], np.float64)
  p = np.exp(logits - logits.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  grad_w = z.T @ (p - np.eye(3)[y3]) / n + 1e-2 * np.asarray(f3["w"], np.float64)
  assert np.abs(grad_w).max() < 1e-3
  assert np.mean(probe.predict_logistic(f3, x3) == y3) > 0.9


def test_mean_pool_ignores_padding():
  h = np.arange(2 * 3 * 2, dtype=np.float32).reshape(2, 3, 2)
  mask = np.array([[1, 1, 0], [1, 0, 0]])
  np.testing.assert_allclose(np.asarray(probe.mean_pool(h, mask)),
                             [h[0, :2].mean(0), h[1, 0]])


def test_run_experiment_reports_the_linear_probe_and_the_frozen_baseline_at_its_lr(shared_data, tmp_path):
  c = tiny.get_config("kind=text,method=lora,steps=2")
  with c.unlocked():
    c.data.path = str(shared_data / "text" / "sst2")
    c.baselines = ("majority", "frozen", "linear_probe")
    c.optim.lr = None
    c.optim.lr_by_method = {"lora": 1e-3, "frozen": 5e-2}
  results = experiment.run_experiment(c, str(tmp_path))
  lp = results["baselines"]["linear_probe"]
  assert 0.0 <= lp["accuracy"] <= 1.0 and lp["n"] == 32 and lp["trainable_params"] == 32 * 2 + 2
  assert "linear_probe" in experiment.summary_table(results)
  assert results["lr"] == 1e-3 and results["baselines"]["frozen"]["lr"] == 5e-2
  # An lr given for the method is not the head's: the baseline keeps the table's entry.
  c2 = tiny.get_config("kind=text,method=lora,steps=1,lr=2e-3")
  with c2.unlocked():
    c2.data.path = str(shared_data / "text" / "sst2")
    c2.baselines = ("frozen",)
    c2.optim.lr_by_method = {"frozen": 5e-2}
  results = experiment.run_experiment(c2, str(tmp_path / "explicit"))
  assert results["lr"] == 2e-3 and results["baselines"]["frozen"]["lr"] == 5e-2


@pytest.mark.parametrize("config_module", [cola, default], ids=["cola", "default"])
@pytest.mark.parametrize("method", ["lora", "dyndora", "frozen"])
def test_head_trains_the_pooler_in_full(config_module, method):
  """configs/cola.py's and configs/default.py's head is BERT's counterpart of RoBERTa's
  classification head (pooler dense + classifier), trained in full for every method; the
  adapters' targets stay the block linears."""
  c = config_module.get_config(f"method={method}")
  bb = models.from_config(models.tiny_config("bert"), "classification")
  m = method_registry.get(method)
  head, frozen = split_params(bb.params, m.trains_backbone, run_lib.head_regex(c, bb, m))
  trained = set(flatten(head))
  assert trained and all(p.startswith(("bert/pooler/", "classifier/")) for p in trained), trained
  assert {"bert/pooler/dense/kernel", "bert/pooler/dense/bias"} <= trained
  assert not any("pooler" in p for p in flatten(frozen))
  targets = re.compile(bb.family.targets(c.adapter.targets))
  adapted = {p for p in flatten(bb.params) if targets.fullmatch(p)}
  assert adapted and not any("pooler" in p or "classifier" in p for p in adapted)
