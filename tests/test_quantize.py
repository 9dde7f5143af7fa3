"""Quantised frozen bases (doran_jax.quant): formats, error bounds, Dense layers, factored
adapters on an NF4/int8 base against the dequantised float base, and a tiny QLoRA-style run."""

from statistics import NormalDist

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import doran_jax as dj
from doran_jax import models, quant
from doran_jax import run as run_lib
from doran_jax.adapters.factored import adapted_apply
from doran_jax.models import hf_io
from doran_jax.models.modeling import layers
from doran_jax.targets import flatten
from test_core_math import perturb

# Typed in from the QLoRA paper (Dettmers et al. 2023, appendix E).
PUBLISHED_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                 -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                 0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
                 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                 0.7229568362236023, 1.0]
FORMATS = [("int8", False), ("nf4", False), ("nf4", True)]


def test_nf4_codebook_equals_the_published_values_and_the_normal_quantile_construction():
  np.testing.assert_array_equal(quant.NF4_CODEBOOK, np.asarray(PUBLISHED_NF4, np.float32))
  # The paper's construction: 8 positive quantiles of N(0, 1) from offset to 1/2, 7 negative
  # ones, an exact zero, normalised to [-1, 1]; offset = (1 - 1/(2·15) + 1 - 1/(2·16)) / 2.
  normal, offset = NormalDist(), 0.5 * ((1 - 1 / 30) + (1 - 1 / 32))
  positive = [normal.inv_cdf(p) for p in np.linspace(offset, 0.5, 9)[:-1]]
  negative = [-normal.inv_cdf(p) for p in np.linspace(offset, 0.5, 8)[:-1]]
  values = np.sort(np.asarray(positive + [0.0] + negative))
  np.testing.assert_allclose(values / np.abs(values).max(), quant.NF4_CODEBOOK, atol=2e-7)


def _kernels():
  rng = np.random.default_rng(0)
  w = rng.standard_normal((100, 40)).astype(np.float32) * 0.05   # in not a multiple of 64
  w[:, 3] = 0.0                                                  # an all-zero column
  w[5, 7] = 3.0                                                  # an outlier
  out = {"random_100x40": w, "random_256x96": rng.standard_t(3, (256, 96)).astype(np.float32)}
  state = hf_io.read_state(models.minilm_path())
  for name in ("encoder.layer.0.attention.self.query.weight",
               "encoder.layer.3.intermediate.dense.weight", "encoder.layer.5.output.dense.weight"):
    out["minilm/" + name] = np.ascontiguousarray(state[name].T)   # torch (out, in) -> (in, out)
  return out


@pytest.fixture(scope="module")
def kernels():
  return _kernels()


@pytest.mark.parametrize("fmt,dq", FORMATS)
def test_quantize_dequantize_error_is_within_the_format_bound(kernels, fmt, dq):
  for name, w in kernels.items():
    q = quant.quantize(w, fmt, double_quant=dq)
    w_hat = np.asarray(quant.dequantize(q, jnp.float32), np.float64)
    assert w_hat.shape == w.shape, name
    err = np.abs(w_hat - w.astype(np.float64))
    if fmt == "int8":
      # Round to nearest of 255 levels over [-absmax, absmax]: at most half a step per channel.
      bound = np.abs(w).max(axis=0, keepdims=True) / 254.0
      assert np.all(err <= bound * (1 + 1e-6) + 1e-12), name
      continue
    d_in = w.shape[0]
    n_blocks = -(-d_in // 64)
    padded = np.zeros((n_blocks * 64, w.shape[1]))
    padded[:d_in] = w
    absmax = np.abs(padded.reshape(n_blocks, 64, -1)).max(axis=1)            # (blocks, out)
    absmax_rows = np.repeat(absmax, 64, axis=0)[:d_in]
    half_gap = np.max(np.diff(np.asarray(PUBLISHED_NF4))) / 2
    used = np.asarray(quant.block_absmax(q), np.float64)
    used_rows = np.repeat(used, 64, axis=0)[:d_in]
    slack = 0.0
    if dq:
      # Double quantisation: the absmax themselves are int8 per block of 256 after centring.
      flat = absmax.reshape(-1)
      centred = np.zeros(-(-flat.size // 256) * 256)
      centred[:flat.size] = flat - flat.astype(np.float32).mean()
      step = np.repeat(np.abs(centred.reshape(-1, 256)).max(axis=1) / 254.0, 256)[:flat.size]
      assert np.all(np.abs(used.reshape(-1) - flat) <= step * (1 + 1e-5) + 1e-9), name
      slack = np.abs(used_rows - absmax_rows)
    else:
      np.testing.assert_array_equal(used, absmax.astype(np.float32))
    assert np.all(err <= half_gap * absmax_rows + slack + 1e-6 * absmax_rows + 1e-12), name
    # Each value took the nearest codebook entry (brute force in float64).
    nearest = np.min(np.abs(w[..., None] / np.where(absmax_rows > 0, absmax_rows, 1)[..., None]
                            - np.asarray(PUBLISHED_NF4)), axis=-1) * absmax_rows
    if not dq:
      np.testing.assert_allclose(err, nearest, atol=1e-6 * float(np.abs(w).max()))
    assert np.all(w_hat[:, np.all(w == 0, axis=0)] == 0), name


@pytest.mark.parametrize("fmt,dq", FORMATS)
def test_storage_bytes_and_kept_column_norm(fmt, dq):
  w = np.random.default_rng(1).standard_normal((512, 256)).astype(np.float32)
  q = quant.quantize(w, fmt, double_quant=dq)
  bits = 8 * q.nbytes / w.size
  assert bits == pytest.approx(quant.analytic_bits(fmt, double_quant=dq, d_in=512, d_out=256))
  assert bits < {"int8": 8.2, "nf4": 4.6 if not dq else 4.2}[fmt]
  w_hat = np.asarray(quant.dequantize(q, jnp.float32), np.float64)
  np.testing.assert_allclose(q.col_sq_norm, np.sum(w_hat**2, axis=0), rtol=1e-6)


def test_quantize_is_deterministic_and_rejects_bad_input():
  w = np.random.default_rng(2).standard_normal((64, 8)).astype(np.float32)
  a, b = quant.quantize(w, "nf4", double_quant=True), quant.quantize(w.copy(), "nf4", double_quant=True)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_array_equal(x, y)
  with pytest.raises(ValueError, match="unknown quantisation format 'nf5'"):
    quant.quantize(w, "nf5")
  with pytest.raises(ValueError, match="2-D"):
    quant.quantize(w[0], "int8")
  with pytest.raises(ValueError, match="double_quant applies to nf4"):
    quant.quantize(w, "int8", double_quant=True)


def _hard_kernels(rng):
  """Kernels that probe every branch of the fast quantiser: shapes around the NF4 block and the
  column stripes, values exactly on (and one ulp either side of) the NF4 midpoints, whole zero
  blocks (with -0.0), zero columns, outliers, subnormals, a subnormal block."""
  mids = quant._NF4_MIDPOINTS
  out = {}
  for shape in [(100, 40), (64, 2), (1, 7), (65, 3), (333, 257), (200, 4099), (130, 1)]:
    w = rng.standard_normal(shape).astype(np.float32) * 0.02
    out[f"random_{shape[0]}x{shape[1]}"] = w
  # Each column: one block holding 1.0 (its absmax) and the 15 midpoints, each exact and one
  # ulp below and above, negated for odd columns; v = w / 1.0 lies exactly on them.
  col = np.concatenate([[1.0], mids, np.nextafter(mids, -2), np.nextafter(mids, 2)])
  col = col.astype(np.float32)
  ties = np.zeros((64 * 3 + 17, 12), np.float32)
  for j in range(12):
    ties[:len(col), j] = col * (1 if j % 2 == 0 else -1)
    # A block with absmax 0.37: w = m·a rounded, so w / a lands on or beside a midpoint.
    a = np.float32(0.37 + 0.01 * j)
    ties[64, j] = a
    ties[65:65 + 15, j] = mids * a
    ties[80:95, j] = -mids * a
  ties[128:192] = -0.0                                          # a whole zero block, signed
  ties[192:, 5] = 0.0                                           # zero tail of a padded block
  out["midpoints"] = ties
  w = rng.standard_t(2, (300, 70)).astype(np.float32)
  w[:, 3] = 0.0                                                 # a zero column
  w[7, 9], w[250, 9] = 1e4, -3e4                                # outliers
  w[:64, 11] = rng.standard_normal(64).astype(np.float32) * 1e-41   # a subnormal block
  w[100:110, 12] = 1e-44                                        # subnormals among normals
  out["outliers_subnormals"] = w
  # ‖W0‖² whose float64 sum rounds to float32 differently in any order but row after row:
  # 1 + 2^-24 (a float32 tie) from the first two blocks, then 128 squares of 2.5e-17, each
  # below half an ulp of the total (lost one at a time) but not all together.
  w = np.zeros((256, 4), np.float32)
  w[0], w[64], w[128:] = 1.0, 2.0**-12, 5e-9
  out["sum_order"] = w
  return out


def _assert_same_kernel(a, b, name):
  assert (a.fmt, a.shape, a.dtype) == (b.fmt, b.shape, b.dtype), name
  fields = ("codes", "scales", "dq_scales", "dq_offset", "col_sq_norm")
  for f in fields:
    x, y = getattr(a, f), getattr(b, f)
    if y is None:
      assert x is None, (name, f)
      continue
    assert x.dtype == y.dtype and x.shape == y.shape, (name, f, x.dtype, y.dtype, x.shape, y.shape)
    # Bit for bit (NaN payloads aside): compare the raw bytes unless both hold NaN there.
    xb, yb = np.asarray(x).reshape(-1).view(np.uint8), np.asarray(y).reshape(-1).view(np.uint8)
    if not np.array_equal(xb, yb):
      np.testing.assert_array_equal(x, y, err_msg=f"{name}: {f}")
      assert np.all(np.isnan(x[x != y])), (name, f)


@pytest.mark.parametrize("fmt,dq", FORMATS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("threads,chunk", [(1, None), (3, None), (2, 256)])
def test_fast_quantize_equals_the_reference_bit_for_bit(monkeypatch, fmt, dq, dtype, threads,
                                                        chunk):
  reference = quant._reference_quantize
  if chunk is not None:
    monkeypatch.setattr(quant, "_CHUNK", chunk)      # many chunks: the carried column sums
  taken = []
  monkeypatch.setattr(quant, "_reference_quantize",
                      lambda w, *a, **k: taken.append(w.shape) or reference(w, *a, **k))
  for name, w in _hard_kernels(np.random.default_rng(5)).items():
    w = w.astype(jnp.dtype(dtype))
    _assert_same_kernel(quant.quantize(w, fmt, double_quant=dq, threads=threads),
                        reference(w, fmt, double_quant=dq), name)
  assert taken == [(130, 1)]        # one output unit: NumPy's pairwise sum, left to the reference


@pytest.mark.filterwarnings("ignore:invalid value encountered")
@pytest.mark.parametrize("fmt,dq", FORMATS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fast_quantize_equals_the_reference_on_non_finite_kernels(fmt, dq, dtype):
  rng = np.random.default_rng(6)
  for bad in (np.nan, np.inf, -np.inf):
    w = rng.standard_normal((150, 9)).astype(np.float32)
    w[70, 4] = bad
    w = w.astype(jnp.dtype(dtype))
    _assert_same_kernel(quant.quantize(w, fmt, double_quant=dq, threads=2),
                        quant._reference_quantize(w, fmt, double_quant=dq), str(bad))


def test_fast_quantize_takes_jax_arrays_and_names_the_dtype():
  w = np.random.default_rng(7).standard_normal((96, 16)).astype(np.float32)
  x = jnp.asarray(w, jnp.bfloat16)
  q = quant.quantize(x, "nf4")
  assert q.dtype == "bfloat16"
  _assert_same_kernel(q, quant._reference_quantize(np.asarray(x), "nf4"), "jax bf16")
  assert quant.quantize(w, "int8", dtype=jnp.bfloat16).dtype == "bfloat16"
  # A strided (non-contiguous) bf16 view, and float16 and float64 kernels.
  for x in (np.asarray(w.T.astype(jnp.bfloat16)).T, w.astype(np.float16), w.astype(np.float64) / 3):
    for fmt in ("int8", "nf4"):
      _assert_same_kernel(quant.quantize(x, fmt, threads=2), quant._reference_quantize(x, fmt),
                          f"{x.dtype} {fmt}")


@pytest.mark.parametrize("fmt,dq", FORMATS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_quantized_dense_equals_float_dense_on_the_dequantised_kernel(fmt, dq, dtype):
  rng = np.random.default_rng(3)
  w = rng.standard_normal((96, 24)).astype(np.float32) * 0.1
  bias = rng.standard_normal(24).astype(np.float32)
  x = jnp.asarray(rng.standard_normal((2, 5, 96)), jnp.float32)
  q = jax.tree_util.tree_map(jnp.asarray, quant.quantize(w, fmt, double_quant=dq))
  ours = layers.Dense(24, dtype=dtype)
  theirs = nn.Dense(24, dtype=dtype)
  fq = lambda x: ours.apply({"params": {"kernel": q, "bias": bias}}, x)  # noqa: E731
  ff = lambda x: theirs.apply({"params": {"kernel": quant.dequantize(q, jnp.float32),  # noqa: E731
                                          "bias": bias}}, x)
  tol = 1e-6 if dtype == jnp.float32 else 1e-2
  np.testing.assert_allclose(np.asarray(fq(x), np.float32), np.asarray(ff(x), np.float32),
                             atol=tol, rtol=tol)
  loss = lambda f: lambda x: jnp.sum(jnp.sin(f(x).astype(jnp.float32)))  # noqa: E731
  np.testing.assert_allclose(jax.grad(loss(fq))(x), jax.grad(loss(ff))(x), atol=tol, rtol=tol)
  assert fq(x).dtype == dtype


def _batch(family, cfg):
  ids = np.random.default_rng(4).integers(0, cfg["vocab_size"], (2, 8)).astype(np.int32)
  batch = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
  if family == "bert":
    batch["token_type_ids"] = np.zeros_like(ids)
  return batch


SETUPS = {"bert": ("classification", r".*/(query|value|intermediate/dense)/kernel"),
          "llama": ("causal_lm", r".*/(q_proj|v_proj|down_proj)/kernel")}


@pytest.fixture(scope="module")
def nf4_backbones():
  out = {}
  for fam, (task, _) in SETUPS.items():
    # Inputs of 128 and 48 features: whole NF4 blocks and a padded one.
    cfg = models.tiny_config(fam, hidden_size=128, intermediate_size=48, num_attention_heads=4)
    out[fam] = models.from_config(cfg, task, num_labels=2 if task == "classification" else None,
                                  quantize="nf4", double_quant=True)
  return out


@pytest.mark.parametrize("family", sorted(SETUPS))
@pytest.mark.parametrize("method", ["lora", "dora", "doran", "dyndora"])
def test_factored_methods_on_nf4_base_equal_the_dequantised_float_base(nf4_backbones, family, method):
  bb = nf4_backbones[family]
  task, targets = SETUPS[family]
  flat = flatten(bb.params)
  quantised = {p for p, x in flat.items() if quant.is_quantized(x)}
  assert {p for p in flat if p.endswith("kernel") and len(np.shape(flat[p])) == 2} - quantised \
      <= {"classifier/kernel", "lm_head/kernel"}
  float_params = quant.dequantize_params(bb.params, jnp.float32)
  cfg = dj.AdapterConfig(method=method, rank=4, targets=targets, mode="factored",
                         dropout=0.1 if method == "dora" else 0.0, noise_std=0.2)
  # Adapters initialised on the quantised base equal those on its dequantised copy.
  init_q = dj.init_adapters(jax.random.key(0), bb.params, cfg)
  init_f = dj.init_adapters(jax.random.key(0), float_params, cfg)
  for x, y in zip(jax.tree_util.tree_leaves(init_q), jax.tree_util.tree_leaves(init_f)):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
  adapters = perturb(init_q, jax.random.key(1))
  batch = _batch(family, bb.config)
  keys = dict(rng=jax.random.key(2), dropout_rng=jax.random.key(3))

  def loss(adapters, params, train):
    out = adapted_apply(bb.apply, params, adapters, cfg, batch, train=train, **keys)
    return jnp.mean(out**2), out

  for train in (True, False):
    (lq, out_q), g_q = jax.value_and_grad(loss, has_aux=True)(adapters, bb.params, train)
    (lf, out_f), g_f = jax.value_and_grad(loss, has_aux=True)(adapters, float_params, train)
    np.testing.assert_allclose(out_q, out_f, atol=1e-5, rtol=1e-5)
    scale = max(float(jnp.max(jnp.abs(x))) for x in jax.tree_util.tree_leaves(g_f))
    for x, y in zip(jax.tree_util.tree_leaves(g_q), jax.tree_util.tree_leaves(g_f)):
      np.testing.assert_allclose(x, y, atol=1e-5 * scale, rtol=1e-4)
  # The unadapted quantised model equals the float model on the dequantised kernels too.
  np.testing.assert_allclose(bb.apply(bb.params, batch), bb.apply(float_params, batch), atol=1e-5)


def test_gradients_flow_only_to_the_adapters(nf4_backbones):
  bb = nf4_backbones["bert"]
  cfg = dj.AdapterConfig(method="dora", rank=4, targets=SETUPS["bert"][1], mode="factored")
  adapters = perturb(dj.init_adapters(jax.random.key(0), bb.params, cfg), jax.random.key(1))
  batch = _batch("bert", bb.config)
  loss = lambda a, p: jnp.sum(adapted_apply(bb.apply, p, a, cfg, batch) ** 2)  # noqa: E731
  g_adapters, g_params = jax.grad(loss, argnums=(0, 1), allow_int=True)(adapters, bb.params)
  assert all(float(jnp.max(jnp.abs(g))) > 0 for g in jax.tree_util.tree_leaves(g_adapters))
  for path, q in flatten(bb.params).items():
    if quant.is_quantized(q):
      g = flatten(g_params)[path]
      for leaf in jax.tree_util.tree_leaves(g):
        if jnp.issubdtype(leaf.dtype, jnp.floating):
          assert float(jnp.max(jnp.abs(leaf))) == 0.0, path


def test_merged_mode_on_a_quantised_base_is_a_clear_error(nf4_backbones, shared_data, tmp_path):
  bb = nf4_backbones["bert"]
  cfg = dj.AdapterConfig(method="dora", rank=4, targets=SETUPS["bert"][1])
  adapters = dj.init_adapters(jax.random.key(0), bb.params, cfg)
  with pytest.raises(ValueError, match=r"merged mode cannot adapt the quantised \(nf4\).*"
                                       r"adapter.mode='factored'"):
    dj.apply_adapters(bb.params, adapters, cfg)
  # An export dequantises first.
  merged = dj.apply_adapters(quant.dequantize_params(bb.params), adapters, cfg)
  assert not quant.any_quantized(merged)
  c = _tiny(shared_data, tmp_path, "kind=text,method=dora,quantize=nf4,mode=merged")
  with pytest.raises(ValueError, match="needs adapter.mode='factored'"):
    run_lib.setup(c)
  c = _tiny(shared_data, tmp_path, "kind=text,method=full,quantize=int8")
  with pytest.raises(ValueError, match="trains the backbone"):
    run_lib.setup(c)


def _tiny(shared_data, workdir, arg, **overrides):
  from test_trainer import tiny_config
  return tiny_config(shared_data, workdir, arg, **overrides)


def test_tiny_nf4_training_trains_evaluates_exports_and_resumes_exactly(shared_data, tmp_path):
  from doran_jax import checkpoint, experiment
  arg = "kind=text,method=doran,mode=factored,quantize=nf4"
  straight = _tiny(shared_data, tmp_path / "straight", arg, num_steps=6, **{"export.merged": True})
  with straight.unlocked():
    straight.model.double_quant = True
  run = run_lib.setup(straight)
  assert quant.any_quantized(run.frozen)
  assert not any("codes" in p or "scales" in p for p in
                 flatten(jax.tree_util.tree_map(np.shape, run.state.trainable)))
  results = experiment.train(straight, run=run)
  full = [h["loss"] for h in results["history"]]
  assert results["eval"]["n"] > 0 and 0.0 <= results["eval"]["accuracy"] <= 1.0
  moved = jax.tree_util.tree_map(lambda a, b: float(jnp.max(jnp.abs(a - b))),
                                 results["state"].trainable["adapters"], run.state.trainable["adapters"])
  assert max(jax.tree_util.tree_leaves(moved)) > 0
  # The checkpoint holds the trainable tree and optimizer state only, not the quantised base.
  mngr = checkpoint.manager(str(tmp_path / "straight" / "checkpoints"))
  stored = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(
      mngr.item_metadata(mngr.latest_step())["state"])[0]]
  mngr.close()
  assert any("lora_a" in p or "hypernet" in p for p in stored)
  assert not any("codes" in p or "scales" in p or "encoder" in p and "kernel" in p for p in stored)
  # The merged export is float: its untargeted kernels are the dequantised base.
  exported = hf_io.read_state(str(tmp_path / "straight" / "export" / "merged"))
  key = "bert.encoder.layer.0.attention.self.key.weight"
  q = flatten(run.frozen)["bert/encoder/layer/0/attention/self/key/kernel"]
  # (jit may fuse the double-quantised absmax into one FMA: equal up to an ulp)
  np.testing.assert_allclose(exported[key].T, np.asarray(quant.dequantize(q, jnp.float32)),
                             rtol=1e-6, atol=1e-9)
  # Resume: a fresh process re-derives the identical base from the same seed and continues exactly.
  interrupted = _tiny(shared_data, tmp_path / "resumed", arg, num_steps=6)
  with interrupted.unlocked():
    interrupted.model.double_quant = True
  first = experiment.train(interrupted, max_steps=3)
  assert first["status"] == "paused"
  second = experiment.train(interrupted)
  assert len(second["history"]) == 3
  np.testing.assert_array_equal(np.array([h["loss"] for h in first["history"] + second["history"]]),
                                np.array(full))


def test_load_backbone_quantises_the_real_minilm_on_load():
  path = models.minilm_path()
  float_bb = models.load_backbone(path, "classification", num_labels=2)
  a = models.load_backbone(path, "classification", num_labels=2, quantize="int8")
  b = models.load_backbone(path, "classification", num_labels=2, quantize="int8")
  flat_f, flat_a, flat_b = flatten(float_bb.params), flatten(a.params), flatten(b.params)
  quantised = sorted(p for p, x in flat_a.items() if quant.is_quantized(x))
  assert len(quantised) == 6 * 6 + 1       # q, k, v, attention out, intermediate, out; pooler
  assert not any(k in p for p in quantised for k in ("embeddings", "LayerNorm", "classifier"))
  for p in quantised:
    for x, y in zip(jax.tree_util.tree_leaves(flat_a[p]), jax.tree_util.tree_leaves(flat_b[p])):
      np.testing.assert_array_equal(x, y)                  # deterministic: resume re-derives it
    # Quantised from the checkpoint's float32, as the reference definition does it.
    ref = quant._reference_quantize(np.asarray(flat_f[p]), "int8")
    _assert_same_kernel(jax.tree_util.tree_map(np.asarray, flat_a[p]), ref, p)
  for p in set(flat_f) - set(quantised):
    np.testing.assert_array_equal(flat_a[p], flat_f[p])
  # int8 kernels: a quarter of float32 plus two float32 per output unit (scale, ‖W0‖²).
  for p in quantised:
    d_in, d_out = flat_f[p].shape
    assert flat_a[p].nbytes == d_in * d_out + 8 * d_out
  ids = np.asarray([[101, 2023, 2003, 1037, 3231, 102]], np.int32)
  batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
  # The fresh head is identical (same seed), so the logits differ only by the int8 base.
  np.testing.assert_allclose(a.apply(a.params, batch), float_bb.apply(float_bb.params, batch),
                             atol=0.05)


@pytest.mark.parametrize("fmt,dq", FORMATS)
def test_quantized_arrays_shard_like_their_kernel(fmt, dq):
  import types
  from jax.sharding import PartitionSpec as P
  from doran_jax import sharding
  mesh = types.SimpleNamespace(shape={"data": 1, "fsdp": 4, "model": 2})
  q = quant.quantize(np.ones((512, 128), np.float32), fmt, double_quant=dq)
  specs = sharding.quantized_specs(q, P("fsdp", "model"), mesh, "k")
  assert specs.codes == P("fsdp", "model")          # int8 (512, 128) / nf4 (256, 128) along in
  assert specs.col_sq_norm == P("model")
  if fmt == "int8":
    assert specs.scales == P("model")
  elif not dq:
    assert specs.scales == P("fsdp", "model")       # (8, 128) block absmax: blocks along in
  else:
    assert specs.scales == P() and specs.dq_scales == P() and specs.dq_offset == P()


def test_tiny_causal_lm_on_an_int8_base_trains_and_generates(shared_data, tmp_path):
  from doran_jax import experiment
  c = _tiny(shared_data, tmp_path, "kind=causal,method=dora,mode=factored,quantize=int8",
            num_steps=2, **{"generate.limit_per_task": 2})
  results = experiment.train(c)
  assert np.isfinite(results["eval"]["eval_loss"])
  assert results["eval"]["commonsense"]            # greedy generation ran on the factored form
