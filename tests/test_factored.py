"""Factored mode (W' never formed) against merged mode, and adapter dropout against an
independent NumPy reference of PEFT's semantics, on perturbed adapters."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import doran_jax as dj
from doran_jax import dropout, models
from doran_jax.adapters import factored
from test_core_math import FAMILIES, METHODS, perturb

FAMS = ("bert", "gpt2", "llama")   # GPT-2: (out, in) Conv1D kernels


@pytest.fixture(scope="module")
def tiny_backbones():
  return {fam: models.from_config(models.tiny_config(fam), FAMILIES[fam][0]) for fam in FAMS}


def assert_close(ours, ref, rel, what):
  """|ours - ref| <= rel * max|ref| over the whole tensor."""
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  err, scale = np.abs(ours - ref).max(), np.abs(ref).max()
  assert np.all(np.isfinite(ours)) and err <= rel * scale, f"{what}: {err:.3g} > {rel} * {scale:.3g}"


def _inputs(bb):
  ids = jax.random.randint(jax.random.key(3), (2, 8), 0, bb.config.vocab_size)
  return {"input_ids": ids, "attention_mask": jnp.ones_like(ids)}


@pytest.mark.parametrize("fam", FAMS)
@pytest.mark.parametrize("method", METHODS)
def test_factored_equals_merged_outputs_and_gradients(tiny_backbones, fam, method):
  bb = tiny_backbones[fam]
  cfg = dj.AdapterConfig(method=method, rank=4, alpha=8.0, targets=FAMILIES[fam][1],
                         transposed=bb.transposed)
  adapters = perturb(dj.init_adapters(jax.random.key(0), bb.params, cfg), jax.random.key(1))
  inputs, key, drop = _inputs(bb), jax.random.key(7), jax.random.key(8)

  def merged(ad, train):
    eff = dj.apply_adapters(bb.params, ad, cfg, rng=key, train=train)
    return bb.apply(eff, inputs, train=train, rng=drop)

  def fact(ad, train):
    return factored.adapted_apply(bb.apply, bb.params, ad, cfg, inputs, rng=key, train=train,
                                  dropout_rng=drop)

  # train=True: DoRAN's noise on tau and the model's own dropout draw the same keys on both paths.
  for train in (False, True):
    assert_close(fact(adapters, train), merged(adapters, train), 1e-5, f"{method} logits train={train}")
  w = jax.random.normal(jax.random.key(5), merged(adapters, False).shape)
  g_m = jax.grad(lambda ad: jnp.sum(merged(ad, True) * w))(adapters)
  g_f = jax.grad(lambda ad: jnp.sum(fact(ad, True) * w))(adapters)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_f), jax.tree_util.tree_leaves(g_m)):
    if np.abs(np.asarray(b)).max() > 0:
      assert_close(a, b, 1e-3, f"{method} grad {jax.tree_util.keystr(path)}")
    else:
      assert np.abs(np.asarray(a)).max() == 0, jax.tree_util.keystr(path)


class _OneDense(nn.Module):
  features: int

  @nn.compact
  def __call__(self, x):
    return nn.Dense(self.features, name="query")(x)


def _one_layer(d_in=12, d_out=10, seed=0):
  """A one-Dense 'model' with the (params, batch, *, train, rng) signature adapted_apply uses."""
  mod = _OneDense(d_out)
  x = jax.random.normal(jax.random.key(seed), (6, d_in))
  params = mod.init(jax.random.key(seed + 1), x)["params"]
  params = jax.tree_util.tree_map(lambda p: p + 0.1, params)   # a non-zero bias

  def model(params, x, train=False, rng=None):
    del train, rng
    return mod.apply({"params": params}, x)

  return model, params, x


def _reference(method, x, params, adapters, cfg, keep):
  """PEFT's Linear / DoRA-variant forward in float64 (peft.tuners.lora, train mode, dropout p)."""
  f64 = lambda v: np.asarray(v, np.float64)
  w0, bias = f64(params["query"]["kernel"]), f64(params["query"]["bias"])
  leaves = adapters["targets"]["query"]
  a, b, s = f64(leaves["lora_a"]), f64(leaves["lora_b"]), cfg.alpha / cfg.rank
  x = f64(x)
  xd = x * keep / (1.0 - cfg.dropout)
  out = x @ w0 + bias                                     # base layer on the clean input
  if method == "lora":
    return out + (s * (xd @ a)) @ b
  g = f64(leaves["magnitude"]) / np.linalg.norm(w0 + s * a @ b, axis=0)
  return out + (g - 1.0) * (xd @ w0) + g * ((s * (xd @ a)) @ b)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_dropout_follows_peft_semantics(method):
  model, params, x = _one_layer()
  cfg = dj.AdapterConfig(method=method, rank=4, alpha=8.0, targets=r"query/kernel", dropout=0.5)
  adapters = perturb(dj.init_adapters(jax.random.key(2), params, cfg), jax.random.key(3), 0.3)
  rng = jax.random.key(11)
  # The mask of target 0 for this key: the contract a user can reproduce (see factored.py).
  key0 = jax.random.fold_in(jax.random.fold_in(rng, factored.DROPOUT_STREAM), 0)
  keep = np.asarray(dropout.keep_mask(key0, 1.0 - cfg.dropout, x.shape), np.float64)
  assert 0 < keep.mean() < 1
  ours = factored.adapted_apply(model, params, adapters, cfg, x, rng=rng, train=True)
  ref = _reference(method, x, params, adapters, cfg, keep)
  assert_close(ours, ref, 1e-5, f"{method} dropout")
  # Not vacuous: without the mask the output differs; eval mode ignores dropout.
  assert np.abs(_reference(method, x, params, adapters, cfg, np.ones_like(keep)) - ref).max() > 1e-3
  no_drop = dataclasses.replace(cfg, dropout=0.0)
  eval_out = factored.adapted_apply(model, params, adapters, cfg, x, rng=rng, train=False)
  merged = model(dj.apply_adapters(params, adapters, no_drop, train=False), x)
  assert_close(eval_out, merged, 1e-5, f"{method} eval ignores dropout")
  with pytest.raises(ValueError, match="needs an rng"):
    factored.adapted_apply(model, params, adapters, cfg, x, train=True)


def test_updated_matmul_gradients_are_exact_and_stay_low_rank():
  """The factored layer's x·(W0 + s·A·B): every gradient equals a float64 NumPy reference of
  the merged chain rule, and with W0 frozen the compiled gradient holds no full-size xᵀ·dy."""
  n_tok, d_in, d_out, r, s = 4 * 32, 64, 48, 2, 0.7
  k = jax.random.split(jax.random.key(0), 5)
  x = jax.random.normal(k[0], (4, 32, d_in))
  w0 = jax.random.normal(k[1], (d_in, d_out))
  a, b = jax.random.normal(k[2], (d_in, r)), jax.random.normal(k[3], (r, d_out))
  ct = jax.random.normal(k[4], (4, 32, d_out))

  def loss(x, w0, a, b):
    return jnp.sum(factored._updated_matmul(x, w0, a, b, s) * ct)

  grads = jax.grad(loss, argnums=(0, 1, 2, 3))(x, w0, a, b)
  x64, w64, a64, b64, c64 = (np.asarray(v, np.float64).reshape(-1, v.shape[-1])
                             for v in (x, w0, a, b, ct))
  v64 = w64 + s * a64 @ b64
  g_v = x64.T @ c64                                   # d loss / d (W0 + s·A·B)
  refs = {"x": c64 @ v64.T, "w0": g_v, "a": s * g_v @ b64.T, "b": s * a64.T @ g_v}
  for (name, ref), got in zip(refs.items(), grads):
    assert_close(np.asarray(got).reshape(ref.shape), ref, 1e-5, f"grad {name}")
  assert_close(factored._updated_matmul(x, w0, a, b, s).reshape(-1, d_out), x64 @ v64, 1e-5,
               "output")

  def flops(f):
    cost = jax.jit(jax.grad(f, argnums=(2, 3))).lower(x, w0, a, b).compile().cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost)["flops"]

  def plain(x, w0, a, b):   # what merged mode's autodiff differentiates
    return jnp.sum((x @ (w0 + s * a @ b)) * ct)

  full_dot = 2 * n_tok * d_in * d_out
  assert flops(plain) >= full_dot                      # autodiff builds xᵀ·dy ...
  assert flops(loss) < full_dot / 2                    # ... the custom VJP does not


@pytest.mark.parametrize("transposed", [False, True])
def test_column_norm_from_v_and_from_the_identity_match_float64(transposed):
  """Both ways the factored layer gets ‖W0 + s·A·B‖: read off the float32 V its dot builds, and
  the column-norm identity (dropout, bf16, quantised kernels), on perturbed A and B, with an
  all-zero column floored at eps."""
  d_in, d_out, r = 24, 10, 3
  k = jax.random.split(jax.random.key(0), 3)
  w0 = np.array(jax.random.normal(k[0], (d_in, d_out)))
  a, b = jax.random.normal(k[1], (d_in, r)), 0.3 * jax.random.normal(k[2], (r, d_out))
  b = b.at[:, 4].set(0.0)
  w0[:, 4] = 0.0                                   # V's column 4 is all zero
  cfg = dj.AdapterConfig(method="dora", rank=r, alpha=2.0 * r, targets=r"query/kernel")
  kernel = jnp.asarray(w0.T if transposed else w0)
  ref = np.linalg.norm(w0 + cfg.scale * np.asarray(a, np.float64) @ np.asarray(b, np.float64),
                       axis=0)
  ref[4] = cfg.norm_eps
  for fused, dtype in ((True, jnp.float32), (False, jnp.float32), (True, jnp.bfloat16)):
    got = factored._column_norm(kernel, a, b, transposed, cfg, dtype, fused)
    assert got.dtype == jnp.float32
    assert_close(got, ref, 1e-6, f"norm fused={fused} {jnp.dtype(dtype).name}")


def test_doran_norm_in_the_gradient_path_factored_equals_merged(tiny_backbones):
  """detach_norm=False: the norm taken from V carries its gradient to A and B (and τ) as merged
  mode's does."""
  bb = tiny_backbones["llama"]
  cfg = dj.AdapterConfig(method="doran", rank=4, alpha=8.0, targets=r".*/(q_proj|down_proj)/kernel",
                         detach_norm=False, noise_std=0.1)
  adapters = perturb(dj.init_adapters(jax.random.key(0), bb.params, cfg), jax.random.key(1))
  inputs, key = _inputs(bb), jax.random.key(7)
  w = jax.random.normal(jax.random.key(5), bb.apply(bb.params, inputs).shape)

  def merged(ad):
    return jnp.sum(bb.apply(dj.apply_adapters(bb.params, ad, cfg, rng=key, train=True), inputs,
                            train=True) * w)

  def fact(ad):
    return jnp.sum(factored.adapted_apply(bb.apply, bb.params, ad, cfg, inputs, rng=key,
                                          train=True) * w)

  detached = dataclasses.replace(cfg, detach_norm=True)
  g_d = jax.grad(lambda ad: jnp.sum(factored.adapted_apply(bb.apply, bb.params, ad, detached,
                                                           inputs, rng=key, train=True) * w))(adapters)
  g_m, g_f = jax.grad(merged)(adapters), jax.grad(fact)(adapters)
  leaves_d = jax.tree_util.tree_leaves(g_d)
  differs = False
  for (path, a), b, d in zip(jax.tree_util.tree_leaves_with_path(g_f), jax.tree_util.tree_leaves(g_m),
                             leaves_d):
    assert_close(a, b, 1e-3, f"grad {jax.tree_util.keystr(path)}")
    differs |= np.abs(np.asarray(a) - np.asarray(d)).max() > 1e-3 * np.abs(np.asarray(a)).max()
  assert differs   # not vacuous: the norm's gradient changes the adapters' gradients
