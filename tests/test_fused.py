"""Memory-lean attention and GELU (modeling/fused_ops.py, our families' `memory_lean` switch):
against NumPy float64 references, against the plain XLA path (outputs and gradients, masks,
dropout, grouped heads), in tiny BERT/RoBERTa/ViT models in train mode on perturbed params (also
under remat), and the memory they save in a compiled training step."""

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from doran_jax import dropout, models
from doran_jax.models import registry
from doran_jax.models.modeling import decoder, fused_ops, layers
from test_core_math import perturb
from test_factored import assert_close

TASKS = {"bert": "classification", "roberta": "classification", "vit": "image_classification"}


def _erf(x):
  return np.vectorize(math.erf)(x)


def test_gelu_matches_float64_reference_and_plain_gelu():
  x = np.concatenate([np.linspace(-12, 12, 2001), np.random.default_rng(0).normal(0, 3, 999)])
  x = x.astype(np.float32)
  x64 = x.astype(np.float64)
  cdf, pdf = 0.5 * (1 + _erf(x64 / math.sqrt(2))), np.exp(-0.5 * x64**2) / math.sqrt(2 * math.pi)
  assert_close(fused_ops.gelu(x), x64 * cdf, 1e-6, "gelu")
  assert_close(jax.vmap(jax.grad(fused_ops.gelu))(x), cdf + x64 * pdf, 1e-6, "gelu'")
  # The same forward ops as the plain GELU: identical values, so lean on/off logits agree.
  np.testing.assert_array_equal(fused_ops.gelu(x), layers.gelu(jnp.asarray(x)))
  np.testing.assert_allclose(jax.vmap(jax.grad(fused_ops.gelu))(x),
                             jax.vmap(jax.grad(layers.gelu))(x), atol=1e-6)
  assert layers.activation("gelu", memory_lean=True) is fused_ops.gelu
  assert layers.activation("gelu") is layers.gelu
  assert layers.activation("gelu_new", memory_lean=True) is layers.gelu_tanh


# ------------------------------------------------------------------------------------ attention

def _reference(q, k, v, mask, keep, rate):
  """softmax(q·kᵀ/√d, key padding)·dropout·v in NumPy float64; (B, T, H, D), GQA by repeat."""
  q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
  g = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
  s = np.einsum("bqhd,bkhd->bhqk", q / math.sqrt(q.shape[-1]), k)
  mask = np.asarray(mask)   # (B, S) key padding or a (B, T, S) mask
  s = np.where(mask[:, None, None, :] if mask.ndim == 2 else mask[:, None], s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  p = p / p.sum(-1, keepdims=True)
  p = np.where(keep, p / (1 - rate), 0.0)
  return np.einsum("bhqk,bkhd->bqhd", p, v)


def _case(seed=0, b=2, t=6, h=6, kv=3, d=4, s=None, masked_row=False):
  s = t if s is None else s
  rng = np.random.default_rng(seed)
  q, w = (jnp.asarray(rng.normal(size=(b, t, h, d)), jnp.float32) for _ in range(2))
  k, v = (jnp.asarray(rng.normal(size=(b, s, kv, d)), jnp.float32) for _ in range(2))
  mask = np.ones((b, s), bool)
  mask[1, s - 2:] = False   # padded keys in the second example
  if masked_row:
    mask[0] = False
  return q, k, v, mask, w


def _assert_matches_central_differences(grads, f, qkv, rng, eps=1e-4):
  """Each gradient of q, k, v against central differences of the float64 reference f(q, k, v),
  along a random direction."""
  for i, name in enumerate("qkv"):
    args = [np.asarray(x, np.float64) for x in qkv]
    direction = rng.normal(size=args[i].shape)
    plus = [a + eps * direction if j == i else a for j, a in enumerate(args)]
    minus = [a - eps * direction if j == i else a for j, a in enumerate(args)]
    numeric = (f(plus) - f(minus)) / (2 * eps)
    analytic = float(np.sum(np.asarray(grads[i], np.float64) * direction))
    assert abs(analytic - numeric) <= 1e-4 * max(1.0, abs(numeric)), (name, analytic, numeric)


def test_lean_attention_matches_float64_reference_forward_and_backward():
  q, k, v, mask, w = _case()
  b, t, h, d = q.shape
  kv, rate = k.shape[2], 0.2
  drop_seed = dropout.seed(jax.random.key(9))
  keep = np.asarray(dropout.keep_mask_from_seed(drop_seed, 1 - rate, (b, kv, h // kv, t, t)))
  assert 0 < keep.mean() < 1

  def lean(q, k, v):
    out = fused_ops.attention(q.reshape(b, t, kv, h // kv, d), k, v, None,
                              mask[:, None, None, None, :], drop_seed, 1 / math.sqrt(d), None,
                              rate)
    return out.reshape(b, t, h, d)

  keep_bhts = keep.reshape(b, h, t, t)
  assert_close(jax.jit(lean)(q, k, v), _reference(q, k, v, mask, keep_bhts, rate), 1e-6, "output")
  # Gradients against central differences of the float64 reference, along random directions.
  grads = jax.jit(jax.grad(lambda *a: jnp.sum(lean(*a) * w), argnums=(0, 1, 2)))(q, k, v)
  rng = np.random.default_rng(1)
  f = lambda a: np.sum(_reference(*a, mask, keep_bhts, rate) * np.asarray(w))  # noqa: E731
  _assert_matches_central_differences(grads, f, (q, k, v), rng)


def _compare(kwargs, impls=("lean",), argnums=(0, 1, 2), seed=0, **case):
  """Each implementation against 'xla': outputs 1e-5, gradients 1e-4 (relative to max |ref|)."""
  q, k, v, mask, w = _case(seed, **case)
  args = (q, k, v) + ((kwargs.pop("bias"),) if "bias" in kwargs else ())

  def run(impl, q, k, v, bias=None):
    extra = {} if bias is None else {"bias": bias}
    return layers.dot_product_attention(q, k, v, mask=mask, implementation=impl, **kwargs,
                                        **extra)

  def value_and_grads(impl):   # one compiled function per path (eager dispatch is slower)
    return jax.jit(lambda *a: (run(impl, *a), jax.grad(
        lambda *a: jnp.sum(run(impl, *a) * w), argnums)(*a)))(*args)

  ref, ref_grads = value_and_grads("xla")
  for impl in impls:
    out, grads = value_and_grads(impl)
    assert_close(out, ref, 1e-5, f"{impl} output {kwargs}")
    for i, a, b in zip(argnums, grads, ref_grads):
      assert_close(a, b, 1e-4, f"{impl} d{'qkvb'[i]} {kwargs}")


@pytest.mark.parametrize("case", ["padding", "dropout", "causal_window_softcap_bias"])
def test_lean_attention_equals_plain_attention(case):
  if case == "padding":
    _compare({}, impls=("lean", "jax"))
  elif case == "dropout":
    # Both paths draw the same per-element mask from the same rng: equal outputs.
    _compare({"dropout_rate": 0.3, "dropout_rng": jax.random.key(5)})
  else:
    bias = jnp.asarray(np.random.default_rng(6).normal(size=(1, 6, 6, 6)), jnp.float32)
    _compare({"causal": True, "window": 3, "logit_softcap": 2.0, "bias": bias,
              "dropout_rate": 0.2, "dropout_rng": jax.random.key(7)}, argnums=(0, 1, 2, 3))


def test_lean_attention_fully_masked_rows_and_jax_path_masks():
  # A row with every key masked softmaxes to uniform in every path (and gets no score gradient).
  _compare({}, impls=("lean", "jax"), seed=3, masked_row=True)
  # jax.nn.dot_product_attention aligns causality top-left: ours (bottom-right, T < S as with a
  # KV cache) goes in as an explicit mask; equal T and S use its own causal and window masks.
  _compare({"causal": True, "window": 4}, impls=("jax",), t=3, s=7)
  _compare({"causal": True, "window": 2}, impls=("jax", "lean"))


def test_causal_blocks_cover_each_querys_visible_keys():
  assert layers.causal_blocks(256, 256, True, None) == [
      (0, 64, 0, 64), (64, 128, 0, 128), (128, 192, 0, 192), (192, 256, 0, 256)]
  assert layers.causal_blocks(160, 160, True, 50) == [
      (0, 64, 0, 64), (64, 128, 15, 128), (128, 160, 79, 160)]
  assert len(layers.causal_blocks(4096, 4096, True, None)) == 8
  # No split: not causal, a KV cache (T != S), or too few queries to gain.
  assert layers.causal_blocks(256, 256, False, None) is None
  assert layers.causal_blocks(256, 320, True, None) is None
  assert layers.causal_blocks(127, 127, True, None) is None


@pytest.mark.parametrize("impl", ["xla", "lean"])
@pytest.mark.parametrize("window", [None, 50])
def test_causal_attention_in_query_blocks_matches_float64_reference(impl, window):
  # T = 160 splits into query blocks (0-64, 64-128, 128-160), each against the keys it can see;
  # outputs and gradients must be those of the whole masked (T, T) square.
  b, t, h, kv, d = 2, 160, 4, 2, 8
  rng = np.random.default_rng(11)
  q, w = (jnp.asarray(rng.normal(size=(b, t, h, d)), jnp.float32) for _ in range(2))
  k, v = (jnp.asarray(rng.normal(size=(b, t, kv, d)), jnp.float32) for _ in range(2))
  pad = np.ones((b, t), bool)
  pad[1, t - 7:] = False   # right padding: every query still sees key 0
  rows, cols = np.arange(t)[:, None], np.arange(t)[None, :]
  visible = (cols <= rows) & (True if window is None else cols > rows - window)
  mask_BxTxS = pad[:, None, :] & visible[None]

  def attn(q, k, v):
    return layers.dot_product_attention(q, k, v, mask=pad, causal=True, window=window,
                                        implementation=impl)

  assert_close(jax.jit(attn)(q, k, v), _reference(q, k, v, mask_BxTxS, True, 0.0), 1e-5,
               "output")
  grads = jax.jit(jax.grad(lambda *a: jnp.sum(attn(*a) * w), argnums=(0, 1, 2)))(q, k, v)
  f = lambda a: np.sum(_reference(*a, mask_BxTxS, True, 0.0) * np.asarray(w))  # noqa: E731
  _assert_matches_central_differences(grads, f, (q, k, v), rng)
  # The split is real: no tensor the size of the whole (B, H, T, T) score square is computed.
  hlo = jax.jit(jax.grad(lambda *a: jnp.sum(attn(*a) * w), argnums=(0, 1, 2))).lower(
      q, k, v).compile().as_text()
  square = [m for m in re.finditer(r"= \w+\[([\d,]*)\]", hlo)
            if math.prod(int(x) for x in m.group(1).split(",") if x) == b * h * t * t]
  assert not square, square[0].group(0)


def _score_sized_transposes(hlo_text, n_scores):
  """Transposes in compiled HLO that produce a tensor of the (B, H, T, S) scores' size."""
  found = []
  for m in re.finditer(r"= \w+\[([\d,]*)\]\{[\d,]*\} transpose\(", hlo_text):
    dims = [int(x) for x in m.group(1).split(",") if x]
    if math.prod(dims) == n_scores:
      found.append(m.group(0))
  return found


@pytest.mark.parametrize("impl", ["lean", "xla"])
def test_attention_never_transposes_score_sized_tensors(impl):
  # Written as einsums over (B, T, H, D), XLA:CPU computed K·Qᵀ and the dO·Vᵀ product in
  # (B, H, S, T) order and transposed them (and the score gradient) in (B, H, T, S)-sized
  # copies: ~7% of a MiniLM CPU step. The head-major dots must keep every such tensor in place.
  b, t, h, d = 2, 16, 4, 8
  q, w = (jax.random.normal(jax.random.key(i), (b, t, h, d)) for i in (0, 1))
  k, v = (jax.random.normal(jax.random.key(i), (b, t, h // 2, d)) for i in (2, 3))
  mask = jnp.ones((b, t), bool).at[1, 12:].set(False)

  def loss(q, k, v):
    o = layers.dot_product_attention(q, k, v, mask=mask, dropout_rate=0.1,
                                     dropout_rng=jax.random.key(4), implementation=impl)
    return jnp.sum(o * o * w)
  hlo = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v).compile().as_text()
  assert hlo.count(" dot(") >= 3, "expected the attention's dots in the compiled step"
  assert _score_sized_transposes(hlo, b * h * t * t) == []


def test_default_implementation_by_backend_and_errors():
  pick = layers.default_implementation
  assert pick(backend="cpu") == "lean"
  assert pick(backend="cpu", dropout=True) == "lean"
  assert pick(backend="cpu", causal=True) == "xla"
  assert pick(backend="cpu", window=8) == "xla"
  assert pick(backend="gpu", dtype=jnp.bfloat16, causal=True, head_dim=64) == "cudnn"
  assert pick(backend="gpu", dtype=jnp.float32) == "xla"        # cuDNN flash is bf16/fp16
  assert pick(backend="gpu", dtype=jnp.bfloat16, dropout=True) == "xla"
  assert pick(backend="gpu", dtype=jnp.bfloat16, head_dim=12) == "xla"
  assert pick(backend="tpu") == "jax"
  assert layers.attention_implementation(True) is None
  assert layers.attention_implementation(False) == "xla"
  q, k, v, _, _ = _case()
  with pytest.raises(ValueError, match="no dropout"):
    layers.dot_product_attention(q, k, v, dropout_rate=0.1, dropout_rng=jax.random.key(0),
                                 implementation="jax")
  with pytest.raises(ValueError, match="unknown attention implementation"):
    layers.dot_product_attention(q, k, v, implementation="flash")


# ---------------------------------------------------------------------------------------- models

def _plain(bb, remat=False):
  """`bb` with memory_lean=False: the same params, plain XLA attention and GELU."""
  module = bb.family.build(bb.config, bb.task, num_labels=bb.config.get("num_labels"),
                           remat=remat, memory_lean=False)
  return bb.replace(model=module)


def _tiny(family, remat=False):
  """(lean backbone, plain backbone, batch): a tiny classifier, dropout 0.1 everywhere."""
  overrides = {"hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1}
  bb = models.from_config(models.tiny_config(family, num_labels=3, **overrides), TASKS[family],
                          remat=remat)
  rng = np.random.default_rng(0)
  if family == "vit":
    c = bb.config
    batch = {"pixel_values": rng.normal(size=(3, c.num_channels, c.image_size, c.image_size))
             .astype(np.float32)}
  else:
    ids = rng.integers(3, bb.config.vocab_size, (3, 12)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[2, 7:] = 0   # padding in the last example
    ids[2, 7:] = bb.config.pad_token_id
    batch = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
  return bb, _plain(bb, remat), batch


def _custom_vjp_calls(fn, *args):
  return str(jax.make_jaxpr(fn)(*args)).count("custom_vjp_call")


def _logits_and_grads(bb, batch, params):
  """Train-mode logits and the gradient of a random projection of them (dropout rng fixed)."""
  w = jax.random.normal(jax.random.key(4), (3, 3))

  def loss(p):
    logits = bb.apply(p, batch, train=True, rng=jax.random.key(3))
    return jnp.sum(logits * w), logits
  (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  return logits, grads


def _assert_grads_close(g_ours, g_ref, what):
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_ours),
                          jax.tree_util.tree_leaves(g_ref)):
    name = jax.tree_util.keystr(path)
    if "'key'" in name and "'bias'" in name:
      continue   # softmax is invariant to the key bias: its gradient is rounding noise
    assert_close(a, b, 1e-4, f"{what} d{name}")


@pytest.mark.parametrize("family", ["bert", "roberta", "vit"])
def test_lean_model_equals_plain_model_outputs_and_gradients(family):
  """Train mode: attention and hidden dropout on, both from the same rng."""
  lean, plain, batch = _tiny(family)
  params = perturb(lean.params, jax.random.key(1), scale=0.05)
  n_layers = lean.config.num_hidden_layers
  # The lean path is really taken: one custom VJP per attention and per GELU in every layer.
  apply = lambda bb: lambda p: bb.apply(p, batch, train=True, rng=jax.random.key(3))  # noqa: E731
  assert _custom_vjp_calls(apply(lean), params) == 2 * n_layers
  assert _custom_vjp_calls(apply(plain), params) == 0
  ours, g_ours = _logits_and_grads(lean, batch, params)
  ref, g_ref = _logits_and_grads(plain, batch, params)
  assert_close(ours, ref, 1e-5, f"{family} logits")
  _assert_grads_close(g_ours, g_ref, family)


def test_lean_layers_inside_rematerialised_blocks():
  """model.remat wraps each block in nn.remat; the lean path is still taken there and agrees."""
  lean, plain, batch = _tiny("bert", remat=True)
  params = perturb(lean.params, jax.random.key(1), scale=0.05)
  assert _custom_vjp_calls(lambda p: lean.apply(p, batch, train=True, rng=jax.random.key(3)), params) == 4
  ours, g_ours = _logits_and_grads(lean, batch, params)
  ref, g_ref = _logits_and_grads(plain, batch, params)
  assert_close(ours, ref, 1e-5, "logits under remat")
  _assert_grads_close(g_ours, g_ref, "under remat")
  # ViT's blocks too (traced on abstract params only: the maths is the non-remat test's).
  fam = registry.get("vit")
  cfg = fam.tiny_config().to_dict()
  vit = fam.build(cfg, "image_classification", remat=True)
  pixels = fam.dummy_batch(cfg, "image_classification")
  params = jax.eval_shape(functools.partial(vit.init, train=False), jax.random.key(0), pixels)
  assert _custom_vjp_calls(lambda v: vit.apply(v, pixels, train=True, rngs={"dropout": jax.random.key(3)}),
                           params) == 4


def test_causal_models_keep_plain_attention_on_cpu():
  """GPT-2 (causal, tanh GELU): nothing swapped on CPU; the switch leaves values unchanged."""
  bb = models.from_config(models.tiny_config("gpt2"), "causal_lm")
  ids = np.random.default_rng(0).integers(0, 128, (2, 8)).astype(np.int32)
  batch = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
  assert _custom_vjp_calls(lambda p: bb.apply(p, batch, train=True, rng=jax.random.key(0)), bb.params) == 0
  plain = bb.replace(model=bb.family.build(bb.config, "causal_lm", memory_lean=False))
  # Same jaxpr either way on CPU: the switch only changes encoder attention and exact GELU.
  assert (str(jax.make_jaxpr(lambda p: bb.apply(p, batch))(bb.params))
          == str(jax.make_jaxpr(lambda p: plain.apply(p, batch))(bb.params)))


def test_lean_training_step_keeps_less_memory():
  """The compiled backward of a BERT layer stack keeps far less with the lean layers: XLA's own
  buffer assignment for the step, not a timing. Six layers, so what each layer keeps for the
  backward pass (plain: its (B, H, T, S) probabilities) outweighs one layer's working set."""
  cfg = models.tiny_config("bert", hidden_size=64, num_hidden_layers=6, num_attention_heads=8,
                           intermediate_size=128, max_position_embeddings=128, num_labels=2)
  ids = np.random.default_rng(0).integers(1, 128, (8, 128)).astype(np.int32)
  batch = {"input_ids": ids, "attention_mask": np.ones_like(ids)}

  lean = models.from_config(cfg, "classification")

  def temp_bytes(memory_lean):
    bb = lean if memory_lean else _plain(lean)

    def loss(p):
      return jnp.sum(bb.apply(p, batch, train=True, rng=jax.random.key(0)))
    compiled = jax.jit(jax.grad(loss)).lower(bb.params).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  lean_bytes, plain_bytes = temp_bytes(True), temp_bytes(False)
  assert lean_bytes < 0.75 * plain_bytes, (lean_bytes, plain_bytes)


def test_build_switch_keeps_param_paths():
  """`memory_lean` changes no param path in any family (adapters and checkpoints rely on them)."""
  builds = [(registry.get(n).build, registry.get(n)) for n in ("bert", "vit", "gpt2")]
  builds.append((decoder.build, registry.get("llama")))
  for build, fam in builds:
    cfg, task = fam.tiny_config().to_dict(), fam.tasks[0]
    batch = fam.dummy_batch(cfg, task)
    trees = [jax.eval_shape(functools.partial(build(cfg, task, memory_lean=lean).init, train=False),
                            jax.random.key(0), batch)
             for lean in (True, False)]
    assert jax.tree_util.tree_structure(trees[0]) == jax.tree_util.tree_structure(trees[1])
