r"""The machine's matmul rate on a compiled step's own matrix shapes, and the CPU it ran on.

A step's GFLOP/s means little alone: the same code reaches 110 GFLOP/s on one CPU and 250 on
another. `matmul_rate` reads every dot_general of the lowered step (forward, backward, adapters),
times each distinct shape alone as a jitted `lax.dot_general`, and returns the FLOP-weighted
rate: the ceiling the step's matmuls could reach here. benchmarks/step.py reports the step's
rate as a fraction of it.

  python benchmarks/step.py --method dora --matmul-probe      # adds matmul_gflops, fraction_of_matmul
"""

from __future__ import annotations

import collections
import platform
import re
import time

import jax
import jax.numpy as jnp
import numpy as np

# `%4 = stablehlo.dot_general %3, %arg0, batching_dims = [0] x [0], contracting_dims = [2] x [2],
#   precision = [...] : (tensor<4x128x384xf32>, tensor<4x128x384xf32>) -> tensor<4x128x128xf32>`
_DOT = re.compile(r"stablehlo\.dot_general\s[^:]*?(?:batching_dims = \[([\d, ]*)\] x \[([\d, ]*)\],\s*)?"
                  r"contracting_dims = \[([\d, ]*)\] x \[([\d, ]*)\][^:]*:\s*"
                  r"\(tensor<([\dx]*)x(\w+)>, tensor<([\dx]*)x\w+>\)")
_NAME = r"@(\"[^\"]+\"|[\w.$-]+)"
_FUNC = re.compile(r"func\.func (?:public |private )?" + _NAME + r"\(")
_CALL = re.compile(r"\bcall " + _NAME + r"\(")

Dot = collections.namedtuple("Dot", "dtype lhs rhs lhs_batch rhs_batch lhs_contract rhs_contract")


def _dims(text: str, sep: str = ",") -> tuple[int, ...]:
  return tuple(int(x) for x in (text or "").replace(" ", "").split(sep) if x)


def dots_in_stablehlo(text: str) -> collections.Counter:
  """Counter of the dot_generals a lowered step executes (operand shapes, dtype, dimensions).

  Reads `jitted.lower(...).as_text()`. A private function's dots count once per call site
  (jax outlines nested jits and custom VJPs into called functions); loop bodies count once.

  Example:
    >>> dots_in_stablehlo(jax.jit(jnp.dot).lower(x, y).as_text())
  """
  own, calls, name = {}, {}, None
  for line in text.splitlines():
    f = _FUNC.search(line)
    if f:
      name = f.group(1)
      own[name], calls[name] = collections.Counter(), collections.Counter()
      continue
    if name is None:
      continue
    m = _DOT.search(line)
    if m:
      lb, rb, lc, rc, lhs, dtype, rhs = m.groups()
      own[name][Dot(dtype, _dims(lhs, "x"), _dims(rhs, "x"), _dims(lb), _dims(rb), _dims(lc),
                    _dims(rc))] += 1
    for callee in _CALL.findall(line):
      calls[name][callee] += 1

  def total(fn, depth=0):
    out = collections.Counter(own.get(fn, {}))
    for callee, n in calls.get(fn, {}).items():
      if callee in own and depth < 50:
        for d, k in total(callee, depth + 1).items():
          out[d] += k * n
    return out

  return total("main") if "main" in own else sum(own.values(), collections.Counter())


def dot_flops(d: Dot) -> float:
  """2 × (batch) × (lhs free) × (rhs free) × (contracted): multiply-adds counted as 2."""
  batch = np.prod([d.lhs[i] for i in d.lhs_batch], dtype=np.float64)
  contract = np.prod([d.lhs[i] for i in d.lhs_contract], dtype=np.float64)
  lhs_free = np.prod([n for i, n in enumerate(d.lhs) if i not in d.lhs_batch + d.lhs_contract],
                     dtype=np.float64)
  rhs_free = np.prod([n for i, n in enumerate(d.rhs) if i not in d.rhs_batch + d.rhs_contract],
                     dtype=np.float64)
  return float(2.0 * batch * contract * lhs_free * rhs_free)


_DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16, "f16": jnp.float16, "f64": jnp.float64}


def time_dot(d: Dot, *, repeats: int = 5) -> float:
  """Median seconds of one jitted dot_general of these shapes (inputs on the default device)."""
  dtype = _DTYPES.get(d.dtype, jnp.float32)
  key_l, key_r = jax.random.split(jax.random.key(0))
  lhs = jax.random.normal(key_l, d.lhs, dtype)
  rhs = jax.random.normal(key_r, d.rhs, dtype)
  numbers = ((d.lhs_contract, d.rhs_contract), (d.lhs_batch, d.rhs_batch))
  fn = jax.jit(lambda a, b: jax.lax.dot_general(a, b, numbers))
  jax.block_until_ready(fn(lhs, rhs))
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(lhs, rhs))
    times.append(time.perf_counter() - t)
  return float(np.median(times))


def kind(d: Dot, *, vocab: int | None = None, max_rank: int = 64) -> str:
  """What a dot computes in a transformer step, from its shapes alone.

  'attention': batched (scores, probabilities × values, and their gradients); 'lm_head': an
  operand spans the vocabulary (`vocab`; the LM head forward and its input gradient);
  'low_rank': a free or contracted dimension of at most `max_rank` (the adapters' A and B and
  their gradients, the DoRA norm's AᵀA); 'dense': the rest (the model's linears, forward and
  input gradients). Example: kind(d, vocab=32000) -> 'lm_head'.
  """
  if d.lhs_batch:
    return "attention"
  if vocab and vocab in d.lhs + d.rhs:
    return "lm_head"
  free_l = [n for i, n in enumerate(d.lhs) if i not in d.lhs_contract]
  free_r = [n for i, n in enumerate(d.rhs) if i not in d.rhs_contract]
  contracted = int(np.prod([d.lhs[i] for i in d.lhs_contract]))
  if min([contracted, *free_l[-1:], *free_r[-1:]]) <= max_rank:
    return "low_rank"
  return "dense"


def matmul_rate(stablehlo_text: str, *, repeats: int = 5, min_flops: float = 1e6,
                vocab: int | None = None, max_rank: int = 64) -> dict:
  """FLOP-weighted GFLOP/s of the step's own dots, each timed alone, in all and by `kind`.

  Dots under `min_flops` (scalars, tiny adapter products) are left out: their time is launch
  overhead, not a rate. Returns {'matmul_gflops', 'matmul_flops_per_step', 'matmul_s_alone',
  'distinct_dots', 'matmul_by_kind': {kind: {'gflop', 'ms_alone', 'gflops'}}}: the seconds the
  step's dots take alone, per kind, so a step's time minus 'matmul_s_alone' is roughly what its
  other work (norms, softmax, cross-entropy, elementwise passes) and the dots' slowdown inside
  the step cost.
  """
  dots = {d: n for d, n in dots_in_stablehlo(stablehlo_text).items() if dot_flops(d) >= min_flops}
  by_kind = collections.defaultdict(lambda: [0.0, 0.0])
  for d, n in dots.items():
    entry = by_kind[kind(d, vocab=vocab, max_rank=max_rank)]
    entry[0] += dot_flops(d) * n
    entry[1] += time_dot(d, repeats=repeats) * n
  flops = sum(f for f, _ in by_kind.values())
  seconds = sum(t for _, t in by_kind.values())
  return {"matmul_gflops": flops / seconds / 1e9 if seconds else float("nan"),
          "matmul_flops_per_step": flops, "matmul_s_alone": seconds, "distinct_dots": len(dots),
          "matmul_by_kind": {k: {"gflop": f / 1e9, "ms_alone": t * 1e3,
                                 "gflops": f / t / 1e9 if t else float("nan")}
                             for k, (f, t) in sorted(by_kind.items())}}


# Widest vector unit first: the /proc/cpuinfo flag and how describe_cpu names it.
_VECTOR_UNITS = (("amx_tile", "avx512+amx"), ("avx512f", "avx512"), ("avx2", "avx2"),
                 ("avx", "avx"))


def describe_cpu(cpuinfo: str) -> str:
  """'AMD EPYC (family 25 model 17, avx512)' from /proc/cpuinfo's text.

  The model name alone does not tell machines apart (two EPYC generations both say "AMD
  EPYC"), and the widest vector unit decides who wins a CPU benchmark: XLA:CPU, PyTorch's
  oneDNN and YNNPACK each pick kernels by it. The first processor's fields win; returns ''
  when the text names no CPU.
  """
  fields = {}
  for line in cpuinfo.splitlines():
    key, sep, value = line.partition(":")
    if sep:
      fields.setdefault(key.strip().lower(), value.strip())
  name = fields.get("model name", "")
  if not name:
    return ""
  flags = set(fields.get("flags", "").split())
  detail = []
  if "cpu family" in fields and "model" in fields:
    detail.append(f"family {fields['cpu family']} model {fields['model']}")
  detail += [label for flag, label in _VECTOR_UNITS if flag in flags][:1]
  return f"{name} ({', '.join(detail)})" if detail else name


def cpu_model() -> str:
  """The CPU as `describe_cpu` names it from /proc/cpuinfo, else platform.processor()."""
  try:
    with open("/proc/cpuinfo") as f:
      named = describe_cpu(f.read())
    if named:
      return named
  except OSError:
    pass
  return platform.processor() or platform.machine()
