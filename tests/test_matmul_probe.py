"""benchmarks/matmul_probe.py: the dots a lowered step runs, their FLOPs, and their rate."""

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import matmul_probe


def _program():
  """Two dots inside a nested jit called twice, one outside, one batched (attention-like)."""
  w = jnp.ones((16, 8))
  inner = jax.jit(lambda a: a @ w)

  def f(x_BxTxD):
    h = jnp.tanh(inner(x_BxTxD)) @ w.T + inner(x_BxTxD) @ w.T
    return jnp.einsum("btd,bsd->bts", h, x_BxTxD)

  return jax.jit(f).lower(jnp.ones((2, 4, 16))).as_text()


def test_counts_dots_per_call_site_with_shapes_and_dimensions():
  dots = matmul_probe.dots_in_stablehlo(_program())
  by_shapes = {(d.lhs, d.rhs): n for d, n in dots.items()}
  assert by_shapes == {((2, 4, 16), (16, 8)): 2, ((2, 4, 8), (8, 16)): 2,
                       ((2, 4, 16), (2, 4, 16)): 1}
  batched = next(d for d in dots if d.lhs_batch)
  assert (batched.lhs_batch, batched.rhs_batch) == ((0,), (0,))
  assert (batched.lhs_contract, batched.rhs_contract) == ((2,), (2,))
  assert all(d.dtype == "f32" for d in dots)


def test_dot_flops_match_a_direct_count():
  dots = matmul_probe.dots_in_stablehlo(_program())
  flops = {(d.lhs, d.rhs): matmul_probe.dot_flops(d) for d in dots}
  # 2 per multiply-add: (B*T) rows x out columns x contracted length.
  assert flops[((2, 4, 16), (16, 8))] == 2 * 8 * 8 * 16
  assert flops[((2, 4, 8), (8, 16))] == 2 * 8 * 16 * 8
  assert flops[((2, 4, 16), (2, 4, 16))] == 2 * 2 * 4 * 4 * 16


def test_matmul_rate_times_what_it_found():
  text = jax.jit(lambda a, b: a @ b).lower(jnp.ones((256, 256)), jnp.ones((256, 256))).as_text()
  out = matmul_probe.matmul_rate(text, repeats=2)
  assert out["distinct_dots"] == 1
  assert out["matmul_flops_per_step"] == 2 * 256**3
  assert np.isfinite(out["matmul_gflops"]) and out["matmul_gflops"] > 0
  # Dots below min_flops are launch overhead, not a rate: none left means no rate.
  assert np.isnan(matmul_probe.matmul_rate(text, min_flops=1e12)["matmul_gflops"])


_CPUINFO = """processor\t: 0
vendor_id\t: {vendor}
cpu family\t: {family}
model\t\t: {model}
model name\t: {name}
flags\t\t: fpu sse2 {flags}

processor\t: 1
model name\t: a second block whose fields must not win
cpu family\t: 99
"""


def test_cpu_description_tells_generations_and_vector_units_apart():
  zen2 = _CPUINFO.format(vendor="AuthenticAMD", family=23, model=49, name="AMD EPYC",
                         flags="avx avx2 fma")
  zen4 = _CPUINFO.format(vendor="AuthenticAMD", family=25, model=17, name="AMD EPYC",
                         flags="avx avx2 avx512f avx512bw avx512_bf16")
  xeon = _CPUINFO.format(vendor="GenuineIntel", family=6, model=143,
                         name="Intel(R) Xeon(R) Platinum 8480+", flags="avx2 avx512f amx_tile")
  assert matmul_probe.describe_cpu(zen2) == "AMD EPYC (family 23 model 49, avx2)"
  assert matmul_probe.describe_cpu(zen4) == "AMD EPYC (family 25 model 17, avx512)"
  assert matmul_probe.describe_cpu(xeon) == ("Intel(R) Xeon(R) Platinum 8480+ "
                                             "(family 6 model 143, avx512+amx)")
  assert matmul_probe.describe_cpu("processor\t: 0\nmodel name\t: Some CPU\n") == "Some CPU"
  assert matmul_probe.describe_cpu("") == ""


def test_cpu_model_is_named():
  assert matmul_probe.cpu_model().strip()


def test_thunk_profile_groups_a_train_step_by_pass_scope_and_kind():
  """benchmarks/thunk_profile.py on a tiny donated 'train step' with a named scope."""
  from benchmarks import thunk_profile

  def step(w_DxD, x_BxD):
    def loss(w):
      with jax.named_scope("block"):
        return jnp.sum(jnp.tanh(x_BxD @ w) ** 2)
    g = jax.grad(loss)(w_DxD)
    return w_DxD - 0.1 * g, loss(w_DxD)

  x = jnp.asarray(np.random.default_rng(0).normal(size=(256, 128)), jnp.float32)
  w = jnp.eye(128, dtype=jnp.float32)
  compiled = jax.jit(step, donate_argnums=(0,)).lower(w, x).compile()
  result = thunk_profile.profile(compiled, (w, x), steps=2)
  assert result["wall_s"] > 0 and 0 < result["thunk_s"]
  passes = {r[0] for r in result["rows"]}
  assert {"forward", "backward"} <= passes
  assert any("block" in r[1] for r in result["rows"])
  assert all(r[3] >= 0 for r in result["rows"])
  assert result["rows"] == sorted(result["rows"], key=lambda r: -r[3])
  table = thunk_profile.markdown(result)
  assert table.count("\n|") >= 3 and "ms / step" in table


def test_dots_are_told_apart_by_kind():
  Dot = matmul_probe.Dot
  lm_head = Dot("f32", (4, 256, 512), (512, 32000), (), (), (2,), (0,))
  lm_head_grad = Dot("f32", (1024, 32000), (512, 32000), (), (), (1,), (1,))
  attention = Dot("f32", (4, 2, 1024, 64), (4, 2, 256, 64), (0, 1), (0, 1), (3,), (3,))
  x_a = Dot("f32", (1024, 512), (512, 16), (), (), (1,), (0,))
  da = Dot("f32", (1024, 16), (1024, 512), (), (), (0,), (0,))
  dense = Dot("f32", (1024, 512), (512, 1408), (), (), (1,), (0,))
  kinds = [matmul_probe.kind(d, vocab=32000) for d in (lm_head, lm_head_grad, attention, x_a, da,
                                                      dense)]
  assert kinds == ["lm_head", "lm_head", "attention", "low_rank", "low_rank", "dense"]
  # Without a vocabulary the head is a dense dot.
  assert matmul_probe.kind(lm_head) == "dense"
  text = jax.jit(lambda a, b, c: (a @ b) @ c).lower(
      jnp.ones((128, 256)), jnp.ones((256, 256)), jnp.ones((256, 8))).as_text()
  out = matmul_probe.matmul_rate(text, repeats=1, min_flops=0)
  assert set(out["matmul_by_kind"]) == {"dense", "low_rank"}
  assert out["matmul_by_kind"]["dense"]["gflop"] == 2 * 128 * 256 * 256 / 1e9
  assert abs(sum(v["ms_alone"] for v in out["matmul_by_kind"].values()) / 1e3
             - out["matmul_s_alone"]) < 1e-9
