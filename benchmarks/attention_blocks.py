#!/usr/bin/env python3
r"""One causal self-attention layer, forward and backward: query blocks against the whole square.

  python -m benchmarks.attention_blocks                         # llama-512's layer, T = 256
  python -m benchmarks.attention_blocks --seq 1024 --rounds 3

`layers.dot_product_attention(..., causal=True)` splits the queries into blocks that score only
the keys they can see (`layers.causal_blocks`); the whole-square form (every (T, T) score
computed, the upper half masked) is what it did before, run here as a non-causal call with the
causal mask passed explicitly. Both paths ('xla', the CPU default for causal attention, and
'lean') are timed alternately in one process, the median of `--steps` calls per round; the JSON
line per (path, form, round) also gives the largest difference from the whole-square 'xla'
result over the output and the q, k, v gradients.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp

from doran_jax.models.modeling import layers

from benchmarks.matmul_probe import cpu_model


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--seq", type=int, default=256)
  p.add_argument("--heads", type=int, default=8)
  p.add_argument("--kv-heads", type=int, default=2)
  p.add_argument("--head-dim", type=int, default=64)
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--rounds", type=int, default=3)
  args = p.parse_args()
  b, t, h, kv, d = args.batch, args.seq, args.heads, args.kv_heads, args.head_dim
  keys = jax.random.split(jax.random.key(0), 4)
  q, w = (jax.random.normal(k, (b, t, h, d)) for k in keys[:2])
  k_, v = (jax.random.normal(k, (b, t, kv, d)) for k in keys[2:])

  def blocked(impl):
    return lambda q, k, v: layers.dot_product_attention(q, k, v, causal=True, implementation=impl)

  # The causal mask given explicitly (causal=False): the whole (T, T) square, as before the split.
  causal_1x1xTxT = jnp.tril(jnp.ones((t, t), bool))[None, None]

  def whole(impl):
    return lambda q, k, v: layers.dot_product_attention(q, k, v, mask=causal_1x1xTxT,
                                                        implementation=impl)

  def value_and_grads(f):
    return jax.jit(lambda q, k, v: (f(q, k, v), jax.grad(
        lambda *a: jnp.sum(f(*a) * w), argnums=(0, 1, 2))(q, k, v)))

  runs = {(impl, form): value_and_grads(make(impl)) for impl in ("xla", "lean")
          for form, make in (("whole", whole), ("blocks", blocked))}
  ref = jax.tree.leaves(runs["xla", "whole"](q, k_, v))
  diffs = {}
  for name, fn in runs.items():
    got = jax.tree.leaves(fn(q, k_, v))
    diffs[name] = max(float(jnp.max(jnp.abs(a - r))) for a, r in zip(got, ref))
  for r in range(args.rounds):
    for (impl, form), fn in runs.items():
      times = []
      for _ in range(args.steps):
        start = time.perf_counter()
        jax.block_until_ready(fn(q, k_, v))
        times.append(time.perf_counter() - start)
      print(json.dumps({"bench": "attention_blocks", "path": impl, "form": form, "round": r,
                        "batch": b, "seq": t, "heads": h, "kv_heads": kv, "head_dim": d,
                        "blocks": len(layers.causal_blocks(t, t, True, None)) if form == "blocks" else 1,
                        "median_ms": round(1e3 * statistics.median(times), 2),
                        "max_abs_diff": diffs[impl, form], "cpu": cpu_model()}))


if __name__ == "__main__":
  main()
