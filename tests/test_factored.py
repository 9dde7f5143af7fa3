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
