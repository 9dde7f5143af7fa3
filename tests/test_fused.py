"""doran_jax.fused: memory-lean attention and GELU against NumPy float64 references and against
the transformers Flax models' own layers (outputs and gradients, train mode with dropout, on
perturbed parameters), and the memory it saves in a compiled training step."""

import math

import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from flax import linen as nn

from doran_jax import fused, models
from doran_jax.models import registry
from test_core_math import perturb
from test_factored import assert_close


def _erf(x):
  return np.vectorize(math.erf)(x)


def test_gelu_matches_float64_reference_and_flax():
  x = np.concatenate([np.linspace(-12, 12, 2001), np.random.default_rng(0).normal(0, 3, 999)])
  x = x.astype(np.float32)
  x64 = x.astype(np.float64)
  cdf, pdf = 0.5 * (1 + _erf(x64 / math.sqrt(2))), np.exp(-0.5 * x64**2) / math.sqrt(2 * math.pi)
  assert_close(fused.gelu(x), x64 * cdf, 1e-6, "gelu")
  assert_close(jax.vmap(jax.grad(fused.gelu))(x), cdf + x64 * pdf, 1e-6, "gelu'")
  exact = lambda v: nn.gelu(v, approximate=False)  # noqa: E731  (the model's ACT2FN['gelu'])
  np.testing.assert_allclose(fused.gelu(x), exact(x), atol=1e-6)
  np.testing.assert_allclose(jax.vmap(jax.grad(fused.gelu))(x), jax.vmap(jax.grad(exact))(x),
                             atol=1e-6)


def _attention_reference(q, k, v, bias, keep):
  """softmax(q·kᵀ/√d + bias)·keep·v in NumPy float64, (B, T, H, D) layout."""
  q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
  s = np.einsum("bqhd,bkhd->bhqk", q / math.sqrt(q.shape[-1]), k) + np.asarray(bias, np.float64)
  p = np.exp(s - s.max(-1, keepdims=True))
  p = p / p.sum(-1, keepdims=True) * np.asarray(keep, np.float64)
  return np.einsum("bhqk,bkhd->bqhd", p, v)


def _attention_case(seed=0, b=2, t=6, h=3, d=4):
  keys = jax.random.split(jax.random.key(seed), 5)
  q, k, v = (jax.random.normal(kk, (b, t, h, d)) for kk in keys[:3])
  mask = np.ones((b, t), np.int32)
  mask[1, 4:] = 0   # padded keys in the second example
  bias = jnp.where(mask[:, None, None, :] > 0, 0.0, jnp.finfo(jnp.float32).min)
  keep = jax.random.bernoulli(keys[3], 0.8, (1, 1, t, t)).astype(jnp.float32) / 0.8
  w = jax.random.normal(keys[4], (b, t, h, d))
  return q, k, v, bias, keep, w


def test_attention_matches_float64_reference_forward_and_backward():
  q, k, v, bias, keep, w = _attention_case()
  assert_close(fused.attention(q, k, v, bias, keep), _attention_reference(q, k, v, bias, keep),
               1e-6, "attention output")
  # Gradients against central differences of the float64 reference, along random directions.
  grads = jax.grad(lambda *a: jnp.sum(fused.attention(*a, bias, keep) * w), argnums=(0, 1, 2))(
      q, k, v)
  rng = np.random.default_rng(1)
  for i, name in enumerate("qkv"):
    direction = rng.normal(size=q.shape)
    args = [np.asarray(t, np.float64) for t in (q, k, v)]
    eps = 1e-4
    plus = [a + (eps * direction if j == i else 0) for j, a in enumerate(args)]
    minus = [a - (eps * direction if j == i else 0) for j, a in enumerate(args)]
    f = lambda a: np.sum(_attention_reference(*a, bias, keep) * np.asarray(w))  # noqa: E731
    numeric = (f(plus) - f(minus)) / (2 * eps)
    analytic = float(np.sum(np.asarray(grads[i], np.float64) * direction))
    assert abs(analytic - numeric) <= 1e-4 * max(1.0, abs(numeric)), (name, analytic, numeric)


def test_attention_without_bias_or_dropout_matches_flax():
  q, k, v, _, _, w = _attention_case(seed=2)

  def flax_attention(q, k, v):
    return jnp.einsum("...hqk,...khd->...qhd", nn.dot_product_attention_weights(q, k), v)

  assert_close(fused.attention(q, k, v, None, None), flax_attention(q, k, v), 1e-6, "output")
  ours = jax.grad(lambda *a: jnp.sum(fused.attention(*a, None, None) * w), (0, 1, 2))(q, k, v)
  ref = jax.grad(lambda *a: jnp.sum(flax_attention(*a) * w), (0, 1, 2))(q, k, v)
  for name, a, b in zip("qkv", ours, ref):
    assert_close(a, b, 1e-5, f"d{name}")


def _tiny(family):
  """(model, inputs) for a tiny BERT, RoBERTa or ViT classifier with dropout 0.1 everywhere."""
  if family == "roberta":
    cfg = transformers.RobertaConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=48,
                                     max_position_embeddings=40, num_labels=3)
    model = transformers.FlaxRobertaForSequenceClassification(cfg, seed=0)
  else:
    cfg = models.tiny_config(family, num_labels=3)
    cls = (transformers.FlaxBertForSequenceClassification if family == "bert"
           else transformers.FlaxViTForImageClassification)
    model = cls(cfg, seed=0)
  inputs = models.dummy_inputs(cfg, batch=3, seq=12)
  if "input_ids" in inputs:
    mask = np.ones_like(inputs["input_ids"])
    mask[2, 7:] = 0   # padding in the last example
    inputs["attention_mask"] = mask
  return model, inputs


def _fused(enabled):
  """The fused layers of every transformers Flax class a family record names (or none)."""
  if not enabled:
    return fused.fused_layers()
  records = [registry.get(n).fused_classes for n in registry.names()]
  return fused.fused_layers(tuple(a for r in records for a in r[0]), tuple(i for r in records for i in r[1]))


def _custom_vjp_calls(fn, *args):
  return str(jax.make_jaxpr(fn)(*args)).count("custom_vjp_call")


@pytest.mark.parametrize("family", ["bert", "roberta", "vit"])
def test_fused_model_equals_model_outputs_and_gradients(family):
  model, inputs = _tiny(family)
  params = perturb(model.params, jax.random.key(1), scale=0.05)
  n_layers = model.config.num_hidden_layers
  head_mask = jnp.asarray(np.random.default_rng(2).uniform(0.5, 1.5, (n_layers, 4)), jnp.float32)
  w = jax.random.normal(jax.random.key(4), (3, 3))

  def loss(p, use_fused, train, **extra):
    with _fused(use_fused):
      logits = model(**inputs, **extra, params=p, dropout_rng=jax.random.key(3), train=train).logits
    return jnp.sum(logits * w), logits

  # The swap happened: one custom VJP per attention and per GELU in every layer.
  assert _custom_vjp_calls(lambda p: loss(p, True, True)[0], params) == 2 * n_layers
  assert _custom_vjp_calls(lambda p: loss(p, False, True)[0], params) == 0
  extras = [{}] if family == "vit" else [{}, {"head_mask": head_mask}]
  for extra in extras:
    for train in (False, True):   # train=True: attention and hidden dropout on the same stream
      (_, ours), g_ours = jax.value_and_grad(loss, has_aux=True)(params, True, train, **extra)
      (_, ref), g_ref = jax.value_and_grad(loss, has_aux=True)(params, False, train, **extra)
      assert_close(ours, ref, 1e-5, f"{family} logits train={train} {list(extra)}")
      for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_ours),
                              jax.tree_util.tree_leaves(g_ref)):
        if "key" in jax.tree_util.keystr(path) and "bias" in jax.tree_util.keystr(path):
          continue   # softmax is invariant to the key bias: its gradient is rounding noise
        assert_close(a, b, 1e-4, f"{family} d{jax.tree_util.keystr(path)} train={train}")


def test_unsupported_calls_and_other_models_run_unchanged():
  model, inputs = _tiny("bert")
  with _fused(True):
    out = model(**inputs, params=model.params, output_attentions=True)
  ref = model(**inputs, params=model.params, output_attentions=True)
  assert len(out.attentions) == 2
  assert_close(out.logits, ref.logits, 1e-6, "logits with output_attentions")
  gpt2 = models.from_config(models.tiny_config("gpt2"), "causal_lm")
  ids = models.dummy_inputs(gpt2.config)["input_ids"]

  def gpt2_logits(p):
    with _fused(True):
      return gpt2.model(input_ids=ids, params=p).logits

  assert _custom_vjp_calls(gpt2_logits, gpt2.params) == 0


def test_fused_training_step_keeps_less_memory():
  """The compiled backward of a BERT layer stack keeps far less with the fused layers: XLA's own
  buffer assignment for the step, not a timing."""
  cfg = transformers.BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2,
                                num_attention_heads=4, intermediate_size=256,
                                max_position_embeddings=128, num_labels=2)
  model = transformers.FlaxBertForSequenceClassification(cfg, seed=0)
  ids = np.random.default_rng(0).integers(1, 128, (8, 128)).astype(np.int32)

  def temp_bytes(use_fused):
    def loss(p):
      with _fused(use_fused):
        logits = model(input_ids=ids, attention_mask=np.ones_like(ids), params=p,
                       dropout_rng=jax.random.key(0), train=True).logits
      return jnp.sum(logits)
    compiled = jax.jit(jax.grad(loss)).lower(model.params).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  fused_bytes, model_bytes = temp_bytes(True), temp_bytes(False)
  assert fused_bytes < 0.75 * model_bytes, (fused_bytes, model_bytes)


def test_fused_layers_inside_rematerialised_blocks():
  """model.remat wraps each block in nn.remat; the swap still happens there and agrees."""
  model, inputs = _tiny("bert")
  model.enable_gradient_checkpointing()
  params = perturb(model.params, jax.random.key(1), scale=0.05)

  def loss(p, use_fused):
    with _fused(use_fused):
      return jnp.sum(model(**inputs, params=p, dropout_rng=jax.random.key(3), train=True).logits)

  assert _custom_vjp_calls(lambda p: loss(p, True), params) == 4
  g_ours, g_ref = jax.grad(loss)(params, True), jax.grad(loss)(params, False)
  assert_close(ravel_pytree(g_ours)[0], ravel_pytree(g_ref)[0],
               1e-4, "gradients under remat")
