"""Adapter math against an independent NumPy (float64) reference of DESIGN.md §3–4, on perturbed
adapters; W' = W0 at init on real and tiny models; noise, jit/grad, and bad inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import doran_jax as dj
from doran_jax import models
from doran_jax.adapters import hypernet
from doran_jax.targets import flatten

FAMILIES = {
    "bert": ("classification", r".*/(query|value|intermediate/dense|output/dense)/kernel"),
    "vit": ("image_classification", r".*/(query|value|intermediate/dense)/kernel"),
    "gpt2": ("causal_lm", r".*/(c_attn|c_proj|c_fc)/kernel"),
    "llama": ("causal_lm", r".*/(q_proj|v_proj|up_proj|down_proj)/kernel"),
}
METHODS = ("lora", "dora", "doran", "dyndora")


@pytest.fixture(scope="module")
def tiny_backbones():
  return {fam: models.from_config(models.tiny_config(fam), task) for fam, (task, _) in FAMILIES.items()}


@pytest.fixture(scope="module")
def minilm():
  return models.load_backbone("minilm", "classification", num_labels=2)


def perturb(tree, key, scale=0.1):
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  keys = jax.random.split(key, len(leaves))
  return treedef.unflatten([x + scale * jax.random.normal(k, x.shape, x.dtype)
                            for k, x in zip(keys, leaves)])


def max_diff(a, b):
  return max(float(jnp.max(jnp.abs(x - y))) for x, y in
             zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


# ------------------------------------------------------------------ independent NumPy reference

def np_softplus(x):
  return np.log1p(np.exp(x))


def np_generate(hyper, d_in, d_out, rank, act=np.tanh):
  """DoRAN's generator for every target of one shape group, one target at a time."""
  out = []
  for e in np.asarray(hyper["embeddings"], np.float64):
    h = act(e @ np.asarray(hyper["w1"], np.float64) + np.asarray(hyper["b1"], np.float64))
    a = h @ np.asarray(hyper["head_a"]["kernel"], np.float64) + np.asarray(hyper["head_a"]["bias"], np.float64)
    b = h @ np.asarray(hyper["head_b"]["kernel"], np.float64) + np.asarray(hyper["head_b"]["bias"], np.float64)
    out.append((a.reshape(d_in, rank), b.reshape(rank, d_out)))
  return out


def np_merged(w_stored, method, leaves, scale, transposed=False, ab=None, xi=None, eps=1e-6):
  """W' for one kernel, in the stored layout, float64."""
  w0 = np.asarray(w_stored, np.float64)
  w0 = w0.T if transposed else w0
  if ab is None:
    a, b = (np.asarray(leaves[k], np.float64) for k in ("lora_a", "lora_b"))
  else:
    a, b = ab
  if method == "dyndora":
    b = np.asarray(leaves["gate"], np.float64)[:, None] * b
  v = w0 + scale * a @ b
  if method in ("lora", "dyndora"):
    w = v
  else:
    n = np.maximum(np.linalg.norm(v, axis=0), eps)
    m = np.asarray(leaves["magnitude"], np.float64)
    if method == "dora":
      w = v * (m / n)[None, :]
    else:
      tau = np_softplus(np.asarray(leaves["tau"], np.float64)) if xi is None else xi
      w = v * (m / (n + tau))[None, :]
  return w.T if transposed else w


def node(tree, module_path):
  for part in module_path.split("/"):
    tree = tree[part]
  return tree


# ------------------------------------------------------------------ tests

@pytest.mark.parametrize("fam", list(FAMILIES))
@pytest.mark.parametrize("method", METHODS)
def test_identity_at_init_tiny(tiny_backbones, fam, method):
  bb = tiny_backbones[fam]
  cfg = dj.AdapterConfig(method=method, rank=4, targets=FAMILIES[fam][1], transposed=bb.transposed)
  adapters = dj.init_adapters(jax.random.key(1), bb.params, cfg)
  assert max_diff(dj.apply_adapters(bb.params, adapters, cfg), bb.params) < 1e-6
  if method == "doran":
    zero_noise = cfg.replace(noise_std=0.0)
    eff = dj.apply_adapters(bb.params, adapters, zero_noise, rng=jax.random.key(2), train=True)
    assert max_diff(eff, bb.params) < 1e-6


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("targets", [r".*/(query|value)/kernel", r".*/(query|key|value|dense)/kernel"])
def test_identity_at_init_real_minilm(minilm, method, targets):
  cfg = dj.AdapterConfig(method=method, rank=8, targets=targets)
  adapters = dj.init_adapters(jax.random.key(0), minilm.params, cfg)
  assert max_diff(dj.apply_adapters(minilm.params, adapters, cfg), minilm.params) < 1e-6


@pytest.mark.parametrize("fam", ["bert", "gpt2", "llama"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("rslora,tau_per_output", [(False, False), (True, True)])
def test_merged_weights_match_numpy_reference(tiny_backbones, fam, method, rslora, tau_per_output):
  bb = tiny_backbones[fam]
  cfg = dj.AdapterConfig(method=method, rank=4, alpha=7.0, targets=FAMILIES[fam][1],
                         transposed=bb.transposed, rslora=rslora, tau_per_output=tau_per_output)
  adapters = perturb(dj.init_adapters(jax.random.key(1), bb.params, cfg), jax.random.key(2))
  with jax.numpy_rank_promotion("raise"):  # no silent broadcasting in the adapter math
    eff = flatten(dj.apply_adapters(bb.params, adapters, cfg, train=False))
  flat = flatten(bb.params)
  targets = dj.targets_for(bb.params, cfg)
  assert any(t.d_in != t.d_out for t in targets)  # the norm axis is exercised on non-square kernels
  scale = 7.0 / (np.sqrt(cfg.stored_rank) if rslora else cfg.stored_rank)
  generated = {}
  if method == "doran":
    for name, group in hypernet.group_targets(targets).items():
      ab = np_generate(adapters["hypernet"][name], group[0].d_in, group[0].d_out, 4)
      generated.update({t.path: g for t, g in zip(group, ab)})
  for t in targets:
    ref = np_merged(flat[t.path], method, node(adapters["targets"], t.module_path), scale,
                    transposed=t.transposed, ab=generated.get(t.path))
    np.testing.assert_allclose(np.asarray(eff[t.path]), ref, rtol=2e-5, atol=2e-6, err_msg=t.path)
    assert np.abs(ref - np.asarray(flat[t.path])).max() > 1e-4  # the perturbation moved W'


def test_gpt2_kernels_are_stored_in_out_like_every_other(tiny_backbones):
  bb = tiny_backbones["gpt2"]
  assert not any(b.transposed for b in tiny_backbones.values())
  assert flatten(bb.params)["transformer/h/0/attn/c_attn/kernel"].shape == (32, 96)
  cfg = dj.AdapterConfig(method="dora", rank=4, targets=r".*/c_attn/kernel")
  adapters = dj.init_adapters(jax.random.key(0), bb.params, cfg)
  leaves = node(adapters["targets"], "transformer/h/0/attn/c_attn")
  # c_attn maps d -> 3·d: in = d, out = 3·d; the magnitude is per output unit.
  assert leaves["lora_a"].shape == (32, 4) and leaves["magnitude"].shape == (96,)


@pytest.mark.parametrize("method,detach_norm", [("dora", True), ("doran", True), ("doran", False)])
def test_all_zero_columns_stay_finite(tiny_backbones, method, detach_norm):
  bb = tiny_backbones["bert"]
  params = jax.tree_util.tree_map(lambda x: x, bb.params)
  q = params["bert"]["encoder"]["layer"]["0"]["attention"]["self"]["query"]
  q["kernel"] = q["kernel"].at[:, :5].set(0.0)
  cfg = dj.AdapterConfig(method=method, rank=4, targets=r".*/query/kernel", detach_norm=detach_norm)
  adapters = dj.init_adapters(jax.random.key(0), params, cfg)
  eff = dj.apply_adapters(params, adapters, cfg)
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(eff))

  def loss(ad):
    w = dj.apply_adapters(params, ad, cfg, rng=jax.random.key(4), train=True)
    return sum(jnp.sum(jnp.sin(x)) for x in jax.tree_util.tree_leaves(w))

  # At init B = 0, so V's columns are exactly zero there (the norm's kink); perturbed, they are not.
  for ad in (adapters, perturb(adapters, jax.random.key(3))):
    grads = jax.jit(jax.grad(loss))(ad)
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree_util.tree_leaves(grads))


def test_doran_noise_is_keyed_and_unbiased(tiny_backbones):
  bb = tiny_backbones["bert"]
  cfg = dj.AdapterConfig(method="doran", rank=4, targets=r".*/query/kernel", noise_std=0.5)
  adapters = perturb(dj.init_adapters(jax.random.key(0), bb.params, cfg), jax.random.key(1))
  a = dj.apply_adapters(bb.params, adapters, cfg, rng=jax.random.key(7), train=True)
  b = dj.apply_adapters(bb.params, adapters, cfg, rng=jax.random.key(7), train=True)
  c = dj.apply_adapters(bb.params, adapters, cfg, rng=jax.random.key(8), train=True)
  assert max_diff(a, b) == 0.0 and max_diff(a, c) > 1e-6
  quiet = cfg.replace(noise_std=0.0)
  assert max_diff(dj.apply_adapters(bb.params, adapters, quiet, rng=jax.random.key(7), train=True),
                  dj.apply_adapters(bb.params, adapters, quiet, train=False)) == 0.0
  from doran_jax.adapters.doran import noisy_tau
  keys = jax.random.split(jax.random.key(9), 4000)
  xi = jax.vmap(lambda k: noisy_tau(jnp.float32(0.3), 8, 0.5, k))(keys)
  assert float(xi.min()) > 0
  assert abs(float(xi.mean()) - 0.3) < 0.01  # E[ξ] = τ


def test_hypernetwork_one_vmapped_call_distinct_targets(tiny_backbones):
  bb = tiny_backbones["bert"]
  counts = {}
  for targets in (r".*/layer/0/attention/self/(query|value)/kernel", r".*/(query|key|value)/kernel"):
    cfg = dj.AdapterConfig(method="doran", rank=4, targets=targets)
    adapters = perturb(dj.init_adapters(jax.random.key(0), bb.params, cfg), jax.random.key(1))
    tg = dj.targets_for(bb.params, cfg)
    jaxpr = jax.make_jaxpr(lambda h: hypernet.generate(h, tg, cfg))(adapters["hypernet"])
    counts[len(tg)] = str(jaxpr).count("dot_general")
    out = hypernet.generate(adapters["hypernet"], tg, cfg)
    bs = [np.asarray(out[t.path][1]) for t in tg]
    assert all(np.abs(bs[i] - bs[j]).max() > 1e-4 for i in range(len(bs)) for j in range(i))
  assert len(counts) == 2 and len(set(counts.values())) == 1, counts  # 2 or 6 targets: same ops


def test_hypernetwork_gradient_joins_targets_without_padding(tiny_backbones):
  """Each target's A and B leave their group's stack through one split, so the backward joins the
  targets' gradients with a concatenate; indexing each target (a[i]) built a zero-padded copy of
  the whole stack per target instead (2% of a merged MiniLM DoRAN CPU step). The gradient equals
  one computed target by target."""
  bb = tiny_backbones["bert"]
  cfg = dj.AdapterConfig(method="doran", rank=4, targets=r".*/(query|key|value)/kernel")
  tg = dj.targets_for(bb.params, cfg)
  hyper = perturb(dj.init_adapters(jax.random.key(0), bb.params, cfg), jax.random.key(1))["hypernet"]
  weights = {t.path: (jnp.full((32, 4), 0.5 + i), jnp.full((4, 32), 1.0 - 0.1 * i))
             for i, t in enumerate(tg)}

  def loss(generated):
    return sum(jnp.sum(jnp.sin(a) * weights[p][0]) + jnp.sum(b * b * weights[p][1])
               for p, (a, b) in generated.items())

  def per_target(h):
    gen = {k: v for k, v in h["32x32"].items() if k != "embeddings"}
    act = hypernet.ACTIVATIONS[cfg.hyper_activation]
    return {t.path: hypernet._generate_one(h["32x32"]["embeddings"][i], gen, t.d_in, t.d_out,
                                           cfg.rank, act)
            for i, t in enumerate(tg)}

  grad = jax.jit(jax.grad(lambda h: loss(hypernet.generate(h, tg, cfg))))
  hlo = grad.lower(hyper).compile().as_text()
  assert len(tg) == 6 and " pad(" not in hlo
  got, want = grad(hyper), jax.grad(lambda h: loss(per_target(h)))(hyper)
  for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-6)


def test_share_block_stacks_generators(tiny_backbones):
  bb = tiny_backbones["bert"]
  cfg = dj.AdapterConfig(method="doran", rank=4, targets=r".*/(query|value)/kernel", share="block")
  adapters = dj.init_adapters(jax.random.key(0), bb.params, cfg)
  assert adapters["hypernet"]["32x32"]["w1"].shape == (2, 8, 8)  # 2 blocks
  assert max_diff(dj.apply_adapters(bb.params, adapters, cfg), bb.params) < 1e-6
  adapters = perturb(adapters, jax.random.key(1))
  tg = dj.targets_for(bb.params, cfg)
  h = adapters["hypernet"]["32x32"]
  out = hypernet.generate(adapters["hypernet"], tg, cfg)
  for i, t in enumerate(tg):
    gen = jax.tree_util.tree_map(lambda x: x[t.block], {k: v for k, v in h.items() if k != "embeddings"})
    ref = np_generate({"embeddings": h["embeddings"][i:i + 1], **gen}, 32, 32, 4)[0]
    np.testing.assert_allclose(np.asarray(out[t.path][0]), ref[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(out[t.path][1]), ref[1], rtol=1e-5, atol=1e-6)


def test_jit_and_grad_reach_the_right_leaves(tiny_backbones):
  bb = tiny_backbones["bert"]
  x = bb.family.dummy_batch(bb.config, bb.task, batch=2)

  def grads_for(cfg, adapters):
    def loss(ad):
      eff = dj.apply_adapters(bb.params, ad, cfg, rng=jax.random.key(5), train=True)
      return jnp.sum(bb.apply(eff, x) ** 2)
    return jax.jit(jax.grad(loss))(adapters)

  lora = dj.AdapterConfig(method="lora", rank=4, targets=r".*/query/kernel")
  g = grads_for(lora, dj.init_adapters(jax.random.key(0), bb.params, lora))
  q = node(g["targets"], "bert/encoder/layer/0/attention/self/query")
  assert float(jnp.abs(q["lora_a"]).max()) == 0.0 and float(jnp.abs(q["lora_b"]).max()) > 0
  dora = lora.replace(method="dora")
  g = grads_for(dora, perturb(dj.init_adapters(jax.random.key(0), bb.params, dora), jax.random.key(1)))
  assert float(jnp.abs(node(g["targets"], "bert/encoder/layer/0/attention/self/query")["magnitude"]).max()) > 0
  doran = lora.replace(method="doran")
  ad = perturb(dj.init_adapters(jax.random.key(0), bb.params, doran), jax.random.key(1))
  g1 = grads_for(doran, ad)
  assert float(jnp.abs(node(g1["targets"], "bert/encoder/layer/0/attention/self/query")["tau"])) > 0
  g2 = grads_for(doran.replace(detach_norm=False), ad)
  assert max_diff(g1["hypernet"], g2["hypernet"]) > 1e-9


def test_param_counts(minilm):
  counts = {}
  for method in METHODS:
    cfg = dj.AdapterConfig(method=method, rank=8, targets=r".*/(query|value)/kernel")
    counts[method] = dj.count_params(dj.init_adapters(jax.random.key(0), minilm.params, cfg))
  assert counts["lora"] == 12 * 8 * (384 + 384)
  assert counts["dora"] == counts["lora"] + 12 * 384
  assert counts["dyndora"] == 12 * (12 * (384 + 384) + 12)  # r0 = 12
  assert 0.5 * counts["lora"] < counts["doran"] < 1.2 * counts["lora"]


def test_bad_inputs_name_the_problem(tiny_backbones):
  bb = tiny_backbones["bert"]
  key = jax.random.key(0)
  with pytest.raises(ValueError, match="unknown method 'lorra'"):
    dj.AdapterConfig(method="lorra")
  with pytest.raises(ValueError, match=r"'\.\*/nothing/kernel' matches no parameter"):
    dj.init_adapters(key, bb.params, dj.AdapterConfig(targets=r".*/nothing/kernel"))
  with pytest.raises(ValueError, match="not a valid regular expression"):
    dj.init_adapters(key, bb.params, dj.AdapterConfig(targets=r".*/(query"))
  with pytest.raises(ValueError, match="rank 64 .* larger than min"):
    dj.init_adapters(key, bb.params, dj.AdapterConfig(rank=64, targets=r".*/query/kernel"))
  with pytest.raises(ValueError, match="only 2-D kernels"):
    dj.init_adapters(key, bb.params, dj.AdapterConfig(targets=r".*/query/bias"))
  cfg = dj.AdapterConfig(method="dora", rank=4, targets=r".*/query/kernel")
  adapters = dj.init_adapters(key, bb.params, cfg)
  with pytest.raises(ValueError, match="needs \\(32, 8\\)"):
    dj.apply_adapters(bb.params, adapters, cfg.replace(rank=8))
  with pytest.raises(ValueError, match="no adapter for target"):
    dj.apply_adapters(bb.params, adapters, cfg.replace(targets=r".*/(query|value)/kernel"))
  other = tiny_backbones["llama"]
  with pytest.raises(ValueError, match="matches no parameter"):
    dj.apply_adapters(other.params, adapters, cfg)
  doran = dj.AdapterConfig(method="doran", rank=4, targets=r".*/query/kernel")
  with pytest.raises(ValueError, match="needs an explicit rng"):
    dj.apply_adapters(bb.params, dj.init_adapters(key, bb.params, doran), doran, train=True)
  # Adapters of one method applied as another: named, not a KeyError deep in the math.
  with pytest.raises(ValueError, match=r"method 'lora' uses \['lora_a', 'lora_b'\]"):
    dj.apply_adapters(bb.params, adapters, cfg.replace(method="lora"))
  # Adapters for modules the regex no longer selects would be silently dropped.
  both = dj.init_adapters(key, bb.params, cfg.replace(targets=r".*/(query|value)/kernel"))
  with pytest.raises(ValueError, match="targets regex .* does not match"):
    dj.apply_adapters(bb.params, both, cfg)
  # A DoRAN generator made with other widths.
  doran_ad = dj.init_adapters(key, bb.params, doran)
  with pytest.raises(ValueError, match="hyper_hidden=16"):
    dj.apply_adapters(bb.params, doran_ad, doran.replace(hyper_hidden=16))
  with pytest.raises(ValueError, match="sequence of kernel paths"):
    dj.AdapterConfig(transposed="transformer/h/0/attn/c_attn/kernel")


def test_config_json_round_trip():
  cfg = dj.AdapterConfig(method="doran", rank=16, alpha=32.0, transposed=("a/kernel",), share="block")
  assert dj.AdapterConfig.from_json(cfg.to_json()) == cfg
  with pytest.raises(ValueError, match="unknown AdapterConfig fields"):
    dj.AdapterConfig.from_dict({"method": "lora", "rnak": 4})


# ------------------------------------------------------------------ DynDoRA's official init

def test_dyndora_official_init_matches_torch_kaiming_uniform_defaults():
  """torch.nn.init.kaiming_uniform_(w) at its defaults (a=0, leaky_relu: gain sqrt 2) draws
  U(±sqrt(6/fan_in)), fan_in = w.size(1): `in` for A's torch (r0, in) weight, r0 for B's (out, r0)."""
  d_in, d_out, rank = 384, 1536, 8
  params = {"enc": {"dense": {"kernel": jnp.asarray(
      np.random.default_rng(0).normal(size=(d_in, d_out)), jnp.float32)}}}
  cfg = dj.AdapterConfig(method="dyndora", rank=rank, targets=r".*/kernel")
  assert cfg.init == "official" and cfg.stored_rank == 12
  leaves = dj.init_adapters(jax.random.key(0), params, cfg)["targets"]["enc"]["dense"]
  a, b = np.asarray(leaves["lora_a"], np.float64), np.asarray(leaves["lora_b"], np.float64)
  assert a.shape == (d_in, 12) and b.shape == (12, d_out) and a.size + b.size > 20_000
  for x, fan_in in ((a, d_in), (b, 12)):
    bound = np.sqrt(6.0 / fan_in)
    assert np.abs(x).max() <= bound
    assert np.abs(x).max() > 0.99 * bound          # the whole interval is used
    assert abs(x.var() / (bound**2 / 3) - 1) < 0.05  # uniform's variance, within 5%
    assert abs(x.mean()) < 0.02 * bound
  # B is far larger than the earlier N(0, 0.02²) draw, and W' = W0 still holds exactly (c = 0).
  assert b.std() > 10 * 0.02
  assert max_diff(dj.apply_adapters(params, {"targets": {"enc": {"dense": leaves}}}, cfg), params) == 0.0
  gauss = dj.init_adapters(jax.random.key(0), params, cfg.replace(init="gaussian"))
  g = gauss["targets"]["enc"]["dense"]
  assert np.abs(np.asarray(g["lora_a"])).max() <= 1 / np.sqrt(d_in)
  assert abs(float(np.asarray(g["lora_b"]).std()) - 0.02) < 0.002
  with pytest.raises(ValueError, match="unknown init 'kaiming'"):
    cfg.replace(init="kaiming")


def test_dyndora_official_init_bounds_agree_with_torch_when_installed():
  torch = pytest.importorskip("torch", reason="the parity extra (requirements-parity.txt)")
  from doran_jax.adapters import dyndora
  for fan_in, shape in ((384, (12, 384)), (12, (384, 12))):
    w = torch.empty(*shape)
    torch.nn.init.kaiming_uniform_(w)
    assert float(w.abs().max()) <= dyndora.kaiming_bound(fan_in) + 1e-7
    assert float(w.abs().max()) > 0.98 * dyndora.kaiming_bound(fan_in)


# ------------------------------------------------------------------ DoRAN's switches

def test_doran_without_generator_is_dora_plus_tau_against_numpy(tiny_backbones):
  bb = tiny_backbones["bert"]
  cfg = dj.AdapterConfig(method="doran", rank=4, alpha=7.0, targets=FAMILIES["bert"][1],
                         generator=False)
  adapters = dj.init_adapters(jax.random.key(1), bb.params, cfg)
  assert "hypernet" not in adapters
  assert max_diff(dj.apply_adapters(bb.params, adapters, cfg), bb.params) < 1e-6  # W' = W0
  adapters = perturb(adapters, jax.random.key(2))
  eff = flatten(dj.apply_adapters(bb.params, adapters, cfg, train=False))
  flat = flatten(bb.params)
  for t in dj.targets_for(bb.params, cfg):
    leaves = node(adapters["targets"], t.module_path)
    assert set(leaves) == {"lora_a", "lora_b", "magnitude", "tau"}
    ref = np_merged(flat[t.path], "doran", leaves, 7.0 / 4)   # static A, B; m / (‖V‖ + τ)
    np.testing.assert_allclose(np.asarray(eff[t.path]), ref, rtol=2e-5, atol=2e-6, err_msg=t.path)
  # τ → 0 gives DoRA itself on the same A, B, m.
  tiny_tau = jax.tree_util.tree_map(lambda x: x, adapters)
  dora_ad = {"targets": jax.tree_util.tree_map(lambda x: x, adapters["targets"])}
  for t in dj.targets_for(bb.params, cfg):
    node(tiny_tau["targets"], t.module_path)["tau"] = jnp.float32(-40.0)   # softplus ≈ 4e-18
    del node(dora_ad["targets"], t.module_path)["tau"]
  dora_cfg = cfg.replace(method="dora")
  assert max_diff(dj.apply_adapters(bb.params, tiny_tau, cfg),
                  dj.apply_adapters(bb.params, dora_ad, dora_cfg)) < 1e-5


def test_doran_noise_std_zero_is_deterministic_in_train_mode(tiny_backbones):
  bb = tiny_backbones["bert"]
  for generator in (True, False):
    cfg = dj.AdapterConfig(method="doran", rank=4, targets=r".*/query/kernel", noise_std=0.0,
                           generator=generator)
    ad = perturb(dj.init_adapters(jax.random.key(0), bb.params, cfg), jax.random.key(1))
    a = dj.apply_adapters(bb.params, ad, cfg, rng=jax.random.key(1), train=True)
    b = dj.apply_adapters(bb.params, ad, cfg, rng=jax.random.key(2), train=True)
    c = dj.apply_adapters(bb.params, ad, cfg, train=True)   # no key needed without noise
    assert max_diff(a, b) == 0.0 and max_diff(a, c) == 0.0
    noisy = cfg.replace(noise_std=0.1)
    assert max_diff(dj.apply_adapters(bb.params, ad, noisy, rng=jax.random.key(1), train=True), a) > 1e-7


def test_share_changes_only_the_generator_tree(tiny_backbones):
  bb = tiny_backbones["bert"]
  cfg = dj.AdapterConfig(method="doran", rank=4, targets=r".*/(query|value)/kernel")
  model = dj.init_adapters(jax.random.key(0), bb.params, cfg)
  block = dj.init_adapters(jax.random.key(0), bb.params, cfg.replace(share="block"))
  # Same per-target leaves (names, shapes and values); only adapters['hypernet'] differs.
  assert jax.tree_util.tree_structure(model["targets"]) == jax.tree_util.tree_structure(block["targets"])
  assert max_diff(model["targets"], block["targets"]) == 0.0
  shapes = lambda t: {p: v.shape for p, v in flatten(t).items()}
  assert set(flatten(model["hypernet"])) == set(flatten(block["hypernet"]))
  differ = {p for p, s in shapes(block["hypernet"]).items() if s != shapes(model["hypernet"])[p]}
  assert differ and all(not p.endswith("embeddings") for p in differ)
  assert all(shapes(block["hypernet"])[p][0] == 2 for p in differ)  # stacked per block


def test_learn_tau_false_gives_zero_tau_gradient_and_unchanged_tau(tiny_backbones):
  import optax
  bb = tiny_backbones["bert"]
  x = bb.family.dummy_batch(bb.config, bb.task, batch=2)
  for generator in (True, False):
    cfg = dj.AdapterConfig(method="doran", rank=4, targets=r".*/query/kernel", learn_tau=False,
                           generator=generator, tau_per_output=not generator)
    ad = perturb(dj.init_adapters(jax.random.key(0), bb.params, cfg), jax.random.key(1))

    def loss(a, cfg=cfg):
      eff = dj.apply_adapters(bb.params, a, cfg, rng=jax.random.key(5), train=True)
      return jnp.sum(bb.apply(eff, x) ** 2)

    g = jax.grad(loss)(ad)
    q = "bert/encoder/layer/0/attention/self/query"
    assert float(jnp.abs(node(g["targets"], q)["tau"]).max()) == 0.0
    assert float(jnp.abs(node(g["targets"], q)["magnitude"]).max()) > 0
    g_learn = jax.grad(lambda a: loss(a, cfg.replace(learn_tau=True)))(ad)
    assert float(jnp.abs(node(g_learn["targets"], q)["tau"]).max()) > 0
    tx = optax.adamw(1e-2, weight_decay=0.01, mask=lambda p: jax.tree_util.tree_map(lambda v: v.ndim >= 2, p))
    state, a = tx.init(ad), ad
    for _ in range(3):
      updates, state = tx.update(jax.grad(loss)(a), state, a)
      a = optax.apply_updates(a, updates)
    np.testing.assert_array_equal(np.asarray(node(a["targets"], q)["tau"]),
                                  np.asarray(node(ad["targets"], q)["tau"]))
    assert max_diff(node(a["targets"], q)["magnitude"], node(ad["targets"], q)["magnitude"]) > 0


def test_doran_switches_bad_combinations_are_clear(tiny_backbones):
  bb = tiny_backbones["bert"]
  cfg = dj.AdapterConfig(method="doran", rank=4, targets=r".*/query/kernel")
  with_gen = dj.init_adapters(jax.random.key(0), bb.params, cfg)
  with pytest.raises(ValueError, match="generator=False uses none"):
    dj.apply_adapters(bb.params, with_gen, cfg.replace(generator=False))
  static = dj.init_adapters(jax.random.key(0), bb.params, cfg.replace(generator=False))
  with pytest.raises(ValueError, match="need adapters\\['hypernet'\\]"):
    dj.apply_adapters(bb.params, static, cfg)
