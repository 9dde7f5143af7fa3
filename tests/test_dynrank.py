"""DynDoRA's dynamic rank allocation: importance, EMA, schedule, global threshold, revival, final mask,
regulariser, reports, and a tiny end-to-end run with a checkpoint taken mid-pruning."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from doran_jax import analysis, checkpoint, experiment, sharding
from doran_jax import run as run_lib
from doran_jax.adapters import dynrank
from doran_jax.adapters import AdapterConfig, init_adapters
from doran_jax.targets import flatten

DYN = dict(prune_start=0.0, prune_end=0.5, prune_interval=10, ema_beta=0.9, eta=0.1)


def dyn(**overrides):
  return {**DYN, **overrides}


def make_adapters(gates, d_in=8, d_out=6, seed=0, orthonormal=False):
  """dyndora adapters for a toy model with one target per entry of `gates` ({name: c (r0,)})."""
  r0 = len(next(iter(gates.values())))
  params = {"enc": {name: {"kernel": jnp.ones((d_in, d_out))} for name in gates}}
  cfg = AdapterConfig(method="dyndora", rank=max(1, math.floor(r0 / 1.5)), targets=r".*/kernel",
                      init_rank_factor=r0 / max(1, math.floor(r0 / 1.5)))
  assert cfg.stored_rank == r0
  adapters = init_adapters(jax.random.key(seed), params, cfg)
  for name, c in gates.items():
    node = adapters["targets"]["enc"][name]
    node["gate"] = jnp.asarray(c, jnp.float32)
    if orthonormal:  # unit, orthogonal a_i and b_i: s_i = |c_i| / ‖c‖
      node["lora_a"] = jnp.eye(d_in, r0)
      node["lora_b"] = jnp.eye(r0, d_out)
  return adapters, cfg


def gate_of(adapters, name):
  return np.asarray(adapters["targets"]["enc"][name]["gate"])


def mask_of(extra, name):
  return np.asarray(extra["mask"]["enc"][name])


# ----------------------------------------------------------------------------------- importance

@pytest.mark.parametrize("d_in,d_out,r0", [(8, 6, 3), (5, 9, 4), (16, 16, 12)])
def test_importance_equals_materialised_outer_products(d_in, d_out, r0):
  ka, kb, kc = jax.random.split(jax.random.key(d_in * d_out + r0), 3)
  a = jax.random.normal(ka, (d_in, r0))
  b = jax.random.normal(kb, (r0, d_out))
  c = jax.random.normal(kc, (r0,)).at[0].set(0.0)
  prods = np.einsum("ir,r,ro->rio", np.asarray(a, np.float64), np.asarray(c, np.float64),
                    np.asarray(b, np.float64))
  want = np.linalg.norm(prods, axis=(1, 2)) / (np.linalg.norm(prods.sum(0)) + 1e-8)
  got = np.asarray(dynrank.component_importance(a, b, c))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)
  assert got[0] == 0.0  # a switched-off component has no importance
  # All gates 0 (the init): ΔW = 0 and every score is 0, not NaN.
  np.testing.assert_array_equal(dynrank.component_importance(a, b, jnp.zeros(r0)), np.zeros(r0))


def test_ema_hand_computed_two_steps():
  # Orthonormal factors: s = |c| / ‖c‖. Step 1: c = (3, 4) -> s = (.6, .8); step 2: c = (0, 1) -> (0, 1).
  adapters, cfg = make_adapters({"q": [3.0, 4.0]}, orthonormal=True)
  extra = dynrank.init_state(adapters, cfg)
  np.testing.assert_array_equal(extra["importance"]["enc"]["q"], [0.0, 0.0])
  late = dyn(prune_start=0.9, prune_end=1.0)  # no pruning in these steps
  adapters, extra = dynrank.post_update(adapters, extra, 1, 100, late)
  np.testing.assert_allclose(extra["importance"]["enc"]["q"], [0.1 * 0.6, 0.1 * 0.8], rtol=1e-6)
  adapters["targets"]["enc"]["q"]["gate"] = jnp.array([0.0, 1.0])
  adapters, extra = dynrank.post_update(adapters, extra, 2, 100, late)
  np.testing.assert_allclose(extra["importance"]["enc"]["q"],
                             [0.9 * 0.06 + 0.1 * 0.0, 0.9 * 0.08 + 0.1 * 1.0], rtol=1e-6)
  np.testing.assert_array_equal(gate_of(adapters, "q"), [0.0, 1.0])  # untouched before the window


# ----------------------------------------------------------------------------------- schedule

def test_schedule_fraction_zero_before_final_at_end_cubic_between():
  cfg = dyn(prune_start=0.15, prune_end=0.5)  # N = 200: start 30, end 100, P = 70
  sched = dynrank.schedule(200, cfg)
  assert (sched.start, sched.end, sched.span) == (30, 100, 70)
  final = (12 - 8) / 12  # r0 = 12, r = 8
  frac = lambda t: float(dynrank.scheduled_fraction(t, 200, cfg, final))
  assert frac(0) == frac(15) == frac(30) == 0.0
  assert frac(100) == pytest.approx(final) and frac(150) == pytest.approx(final)
  for t in (37, 65, 93):
    assert frac(t) == pytest.approx(final * ((t - 30) / 70) ** 3, rel=1e-5)
  assert frac(65) / frac(37) == pytest.approx((35 / 7) ** 3, rel=1e-4)  # cubic, not linear
  prune = [t for t in range(0, 201) if bool(dynrank.is_prune_step(t, 200, cfg))]
  assert prune == list(range(30, 101, 10))
  # The last prune happens at p = P even when P is not a multiple of the interval.
  assert [t for t in range(60) if dynrank.is_prune_step(t, 50, dyn(prune_start=0.2, prune_end=0.9,
                                                                     prune_interval=7))] == [10, 17, 24, 31, 38, 45]


def test_pruned_count_follows_the_schedule():
  # 4 targets x r0 = 6, distinct importances, budget 4 x 4 = 16 -> n - budget = 8 at the end.
  rng = np.random.default_rng(0)
  gates = {f"t{i}": rng.uniform(0.5, 2.0, size=6) for i in range(4)}
  adapters, cfg = make_adapters(gates)
  assert cfg.rank == 4 and cfg.stored_rank == 6
  extra = dynrank.init_state(adapters, cfg)
  assert int(extra["budget"]) == 16
  cfg_dyn = dyn(prune_interval=5, ema_beta=0.0)  # N = 100: window [0, 50]; β = 0: s̄ = s
  step = jax.jit(lambda a, e, t: dynrank.post_update(a, e, t, 100, cfg_dyn))
  for t in range(1, 61):
    fresh = {"targets": {"enc": {n: {**adapters["targets"]["enc"][n], "gate": jnp.asarray(gates[n])}
                                 for n in gates}}}  # every prune sees all components again
    out, extra = step(fresh, extra, t)
    pruned = sum(int((mask_of(extra, n) == 0).sum()) for n in gates)
    if t % 5 == 0 and t <= 50:
      want = math.floor(8 * (t / 50) ** 3 + 1e-9)
      assert pruned == want, t
      zeroed = sum(int((gate_of(out, n) == 0).sum()) for n in gates)
      assert zeroed == want, t
  assert pruned == 8


def test_global_threshold_prunes_all_ties():
  # Two identical targets, s = (1/3, 2/3, 2/3) each. At k = 1 the threshold is 1/3 and both
  # components scoring exactly 1/3 go; nothing scoring 2/3 does.
  adapters, cfg = make_adapters({"a": [1.0, 2.0, 2.0], "b": [1.0, 2.0, 2.0]}, orthonormal=True)
  assert cfg.rank == 2  # n = 6, budget 4 -> n - budget = 2; at p/P = 0.8: k = ⌊2·0.512⌋ = 1
  extra = dynrank.init_state(adapters, cfg)
  k = dynrank.num_to_prune(40, 100, DYN, 6, extra["budget"])
  assert int(k) == 1
  adapters, extra = dynrank.post_update(adapters, extra, 40, 100, dyn(ema_beta=0.0))
  for name in ("a", "b"):
    np.testing.assert_array_equal(mask_of(extra, name), [0.0, 1.0, 1.0])
    np.testing.assert_array_equal(gate_of(adapters, name), [0.0, 2.0, 2.0])
  # Directly: distinct scores prune exactly k, a tie at the k-th prunes every tied component.
  m = dynrank.prune_mask({"x": jnp.array([0.1, 0.3, 0.2]), "y": jnp.array([0.4, 0.2])}, 2)
  np.testing.assert_array_equal(m["x"], [0, 1, 0])
  np.testing.assert_array_equal(m["y"], [1, 0])
  m = dynrank.prune_mask({"x": jnp.array([0.1, 0.3, 0.2]), "y": jnp.array([0.4, 0.5])}, 0)
  assert all(np.all(v == 1) for v in m.values())


def test_revival_between_prunes_then_final_mask_held():
  adapters, cfg = make_adapters({"a": [0.1, 2.0, 3.0], "b": [1.5, 2.5, 0.2]}, orthonormal=True)
  extra = dynrank.init_state(adapters, cfg)
  cfg_dyn = dyn(ema_beta=0.0)  # N = 100, window [0, 50], prunes at 10, 20, ..., 50
  step = jax.jit(lambda a, e, t: dynrank.post_update(a, e, t, 100, cfg_dyn))
  adapters, extra = step(adapters, extra, 40)  # k = 1: the smallest (a, 0) goes
  assert gate_of(adapters, "a")[0] == 0.0 and mask_of(extra, "a")[0] == 0.0
  # The optimizer moves the pruned gate; between prunes nothing switches it back off.
  adapters["targets"]["enc"]["a"]["gate"] = adapters["targets"]["enc"]["a"]["gate"].at[0].set(0.05)
  adapters, extra = step(adapters, extra, 41)
  assert gate_of(adapters, "a")[0] == np.float32(0.05)  # revived
  assert mask_of(extra, "a")[0] == 0.0  # the mask still records the last prune
  adapters, extra = step(adapters, extra, 50)  # final prune: k = 2 -> (b, 2) and (a, 0)
  np.testing.assert_array_equal(mask_of(extra, "a"), [0, 1, 1])
  np.testing.assert_array_equal(mask_of(extra, "b"), [1, 1, 0])
  for t in (51, 52, 80):  # after the window every optimizer update to a pruned gate is undone
    for name, i in (("a", 0), ("b", 2)):
      node = adapters["targets"]["enc"][name]
      node["gate"] = node["gate"].at[i].set(5.0)
    frozen_ema = extra["importance"]
    adapters, extra = step(adapters, extra, t)
    assert gate_of(adapters, "a")[0] == 0.0 and gate_of(adapters, "b")[2] == 0.0
    assert gate_of(adapters, "a")[1] == 2.0  # live gates untouched
    jax.tree_util.tree_map(np.testing.assert_array_equal, extra["importance"], frozen_ema)


# ----------------------------------------------------------------------------------- regulariser

def test_regularizer_value_window_and_gradient():
  adapters, _ = make_adapters({"a": [0.5, 1.0, 1.5], "b": [1.0, 0.0, 2.0]}, d_in=7, d_out=5, seed=3)
  var_sum = 0.0
  for name in ("a", "b"):
    node = adapters["targets"]["enc"][name]
    var_sum += np.var(np.asarray(node["lora_a"], np.float64), axis=0, ddof=1).sum()
    var_sum += np.var(np.asarray(node["lora_b"], np.float64), axis=1, ddof=1).sum()
  cfg_dyn = dyn(eta=0.3)  # N = 100: window ends at t = 50
  reg = lambda s: float(dynrank.regularizer(adapters, s, 100, cfg_dyn))
  assert reg(0) == pytest.approx(0.3 * var_sum / (2 * 2 * 3), rel=1e-5)
  assert reg(49) == reg(0)  # the step that triggers the last prune (t = 50) still has it
  assert reg(50) == 0.0 and reg(99) == 0.0
  grads = jax.grad(lambda a: dynrank.regularizer(a, jnp.int32(5), 100, cfg_dyn))(adapters)
  node = grads["targets"]["enc"]["a"]
  assert np.abs(np.asarray(node["lora_a"])).max() > 0 and np.abs(np.asarray(node["lora_b"])).max() > 0
  assert np.all(np.asarray(node["gate"]) == 0)


# ----------------------------------------------------------------------------------- reports, errors

def test_live_ranks_params_and_report(tmp_path):
  adapters, _ = make_adapters({"q": [1.0, 0.0, 2.0], "v": [0.0, 0.0, 3.0]}, d_in=8, d_out=6)
  assert dynrank.live_ranks(adapters) == {"enc/q": 2, "enc/v": 1}
  assert dynrank.count_live_params(adapters) == 3 * (8 + 6 + 1)
  png = tmp_path / "plots" / "ranks.png"
  text = analysis.rank_report(adapters, str(png))
  rows = [line for line in text.splitlines() if line.startswith("| q ") or line.startswith("| v ")]
  assert [r.split("|")[2].strip() for r in rows] == ["2", "1"]
  assert "3 of 6 components live" in text and "45 of 90 stored" in text
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
  assert "plot:" not in analysis.rank_report(adapters)


def test_bad_inputs_are_clear_errors():
  adapters, cfg = make_adapters({"q": [1.0, 0.0, 2.0]})
  with pytest.raises(ValueError, match="prune_start <= prune_end"):
    dynrank.schedule(100, dyn(prune_start=0.6, prune_end=0.5))
  with pytest.raises(ValueError, match="prune_interval must be a positive integer"):
    dynrank.schedule(100, dyn(prune_interval=0))
  with pytest.raises(ValueError, match="ema_beta"):
    dynrank.schedule(100, dyn(ema_beta=1.0))
  with pytest.raises(ValueError, match="has no 'eta'"):
    dynrank.schedule(100, {k: v for k, v in DYN.items() if k != "eta"})
  with pytest.raises(ValueError, match="method 'lora'"):
    dynrank.init_state(adapters, cfg.replace(method="lora"))
  with pytest.raises(ValueError, match="stored rank is 6"):
    dynrank.init_state(adapters, cfg.replace(rank=4))
  lora = init_adapters(jax.random.key(0), {"enc": {"q": {"kernel": jnp.ones((8, 6))}}},
                       AdapterConfig(method="lora", rank=2, targets=r".*/kernel"))
  with pytest.raises(ValueError, match="no dyndora 'gate' leaves"):
    dynrank.live_ranks(lora)
  other, _ = make_adapters({"k": [1.0, 0.0, 2.0]})
  with pytest.raises(ValueError, match="was `extra` made by init_state"):
    dynrank.post_update(other, dynrank.init_state(adapters, cfg), 1, 10, DYN)


# ----------------------------------------------------------------------------------- end to end

N_STEPS, PAUSE = 40, 15  # window [6, 20], prune every 2; first non-empty prune at t = 14 (k = 1)


def dyndora_config(shared_data, workdir):
  c = tiny.get_config("kind=text,method=dyndora")
  with c.unlocked():
    c.workdir = str(workdir)
    c.data.path = str(shared_data / "text" / "sst2")
    c.num_steps = N_STEPS
    c.checkpoint.every = 1000
    c.log_every = 1000
    c.dyndora.prune_interval = 2
  return c


@pytest.fixture(scope="module")
def straight(shared_data, tmp_path_factory):
  c = dyndora_config(shared_data, tmp_path_factory.mktemp("straight"))
  run = run_lib.setup(c)
  results = experiment.train(c, run=run)
  return results, results["state"]


def test_tiny_run_ends_at_the_budget_with_the_mask_held(straight):
  results, state = straight
  adapters, extra = state.trainable["adapters"], dynrank.pruning_state(state.opt_state)
  assert results["status"] == "done" and all(np.isfinite(h["loss"]) for h in results["history"])
  ranks = dynrank.live_ranks(adapters)
  assert len(ranks) == 4 and int(extra["budget"]) == 4 * 4  # 2 layers x (query, value), rank 4
  assert abs(sum(ranks.values()) - 16) <= 1, ranks
  # Pruning ended at t = 20; 20 more AdamW updates later every pruned gate is still exactly 0.
  for module, gate in dynrank.gates(adapters).items():
    mask = np.asarray(flatten(extra["mask"])[module])
    assert np.all(np.asarray(gate)[mask == 0] == 0.0), module
    assert np.all(np.asarray(gate)[mask == 1] != 0.0), module
  assert dynrank.count_live_params(adapters) == sum(ranks.values()) * (32 + 32 + 1)
  assert dynrank.count_live_params(adapters) < results["adapter_params"]


def test_checkpoint_mid_pruning_resumes_to_the_same_mask_and_losses(shared_data, tmp_path, straight):
  full_results, full_state = straight
  c = dyndora_config(shared_data, tmp_path)
  first = experiment.train(c, max_steps=PAUSE)
  assert first["status"] == "paused"
  run = run_lib.setup(c)
  abstract = sharding.abstract(run.state)
  mngr = checkpoint.manager(str(tmp_path / "checkpoints"))
  mid, _ = checkpoint.restore(mngr, abstract)
  mngr.close()
  assert int(mid.step) == PAUSE
  mid_extra = dynrank.pruning_state(mid.opt_state)
  assert int(mid_extra["count"]) == PAUSE  # the state rides in opt_state, checkpointed with it
  mid_mask = flatten(mid_extra["mask"])
  mid_gates = dynrank.gates(mid.trainable["adapters"])
  pruned = [(m, i) for m, v in mid_mask.items() for i in np.flatnonzero(np.asarray(v) == 0)]
  assert len(pruned) >= 1  # the prune at t = 14 switched something off ...
  # ... and the AdamW update at t = 15 revived it: pruning is still going on, nothing masks it.
  assert any(float(mid_gates[m][i]) != 0.0 for m, i in pruned)
  assert np.all(np.asarray(jax.tree_util.tree_leaves(mid_extra["importance"])[0]) > 0)

  second = experiment.train(c, run=run)
  assert len(second["history"]) == N_STEPS - PAUSE  # resumed, not restarted
  losses = [h["loss"] for h in first["history"] + second["history"]]
  np.testing.assert_array_equal(np.array(losses), np.array([h["loss"] for h in full_results["history"]]))
  resumed, straight_extra = (dynrank.pruning_state(s.opt_state) for s in (second["state"], full_state))
  for name in ("mask", "importance"):
    jax.tree_util.tree_map(np.testing.assert_array_equal, resumed[name], straight_extra[name])
  jax.tree_util.tree_map(np.testing.assert_array_equal, dynrank.gates(second["state"].trainable["adapters"]),
                         dynrank.gates(full_state.trainable["adapters"]))
