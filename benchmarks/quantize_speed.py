#!/usr/bin/env python3
r"""Quantiser speed per tensor: `quant.quantize` against `quant._reference_quantize`, one layer.

  python benchmarks/quantize_speed.py                     # 1b and 7b layers, int8 / nf4 / nf4+dq
  python benchmarks/quantize_speed.py --sizes 1b --formats nf4 --repeats 3
  python benchmarks/quantize_speed.py --no-reference --threads 1,2   # the fast path only

Quantises one decoder layer's Dense kernels (q, k, v, o, gate, up, down in our (in, out)
layout, random bf16 like `scripts/load_memory.py`'s checkpoints) of the LLaMA shapes in
`scripts/load_memory.py`, checks that the result equals the reference bit for bit, and prints
the seconds per tensor (fast: best of --repeats; reference: one run), their ratio, and the
layer total times the layer count: the quantisation a whole `load_memory.py` load adds. One
JSON line per tensor and format goes to --out. The CPU model and the load average before and
after are printed: on a shared machine the figures are only comparable within one sitting.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.matmul_probe import cpu_model  # noqa: E402
from doran_jax import quant  # noqa: E402
from scripts.load_memory import SIZES, layer_tensors  # noqa: E402

FORMATS = {"int8": ("int8", False), "nf4": ("nf4", False), "nf4+dq": ("nf4", True)}


def layer_kernels(size: str, seed: int = 0) -> dict[str, np.ndarray]:
  """One layer's 2-D kernels as (in, out) bf16 arrays, N(0, 0.02) like load_memory's weights."""
  import ml_dtypes
  rng = np.random.default_rng(seed)
  out = {}
  for name, shape in layer_tensors(SIZES[size], 0).items():
    if len(shape) == 2:
      w_OxI = rng.standard_normal(shape, np.float32) * np.float32(0.02)
      out[name.split(".")[-2]] = np.ascontiguousarray(w_OxI.T).astype(ml_dtypes.bfloat16)
  return out


def _same(a, b) -> bool:
  for f in ("codes", "scales", "dq_scales", "dq_offset", "col_sq_norm"):
    x, y = getattr(a, f), getattr(b, f)
    if (x is None) != (y is None) or (x is not None and not (
        x.dtype == y.dtype and np.array_equal(x, y, equal_nan=True))):
      return False
  return True


def _time(fn, repeats: int) -> tuple[float, object]:
  best, out = float("inf"), None
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = fn()
    best = min(best, time.perf_counter() - t0)
  return best, out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--sizes", default="1b,7b", help=f"comma list of {sorted(SIZES)}")
  p.add_argument("--formats", default=",".join(FORMATS), help=f"comma list of {list(FORMATS)}")
  p.add_argument("--threads", default="", help="comma list of thread counts for the fast path "
                 "(default: quantize's own default)")
  p.add_argument("--repeats", type=int, default=2, help="fast-path runs per tensor (best kept)")
  p.add_argument("--no-reference", action="store_true", help="skip the slow reference")
  p.add_argument("--out", default=None, help="append one JSON line per tensor and format here")
  args = p.parse_args(argv)
  threads = [int(t) for t in args.threads.split(",") if t] or [None]
  print(f"cpu: {cpu_model()}, {len(os.sched_getaffinity(0))} usable cores; "
        f"load average before: {os.getloadavg()}")
  records = []
  for size in args.sizes.split(","):
    kernels = layer_kernels(size)
    n_layers = SIZES[size]["num_hidden_layers"]
    for label in args.formats.split(","):
      fmt, dq = FORMATS[label]
      total = {"ref": 0.0, **{t: 0.0 for t in threads}}
      for name, w in kernels.items():
        rec = {"size": size, "format": label, "tensor": name, "shape_in_out": list(w.shape)}
        ref = None
        if not args.no_reference:
          rec["reference_s"], ref = _time(
              lambda: quant._reference_quantize(w, fmt, double_quant=dq), 1)
          total["ref"] += rec["reference_s"]
        for t in threads:
          s, q = _time(lambda: quant.quantize(w, fmt, double_quant=dq, threads=t), args.repeats)
          rec[f"fast_s_threads_{t or 'default'}"] = s
          total[t] += s
          if ref is not None and not _same(q, ref):
            raise SystemExit(f"{size} {label} {name}: the fast path differs from the reference")
        parts = [f"{k.removesuffix('_s').replace('_s_', ' ')} {v:.3f} s" for k, v in rec.items()
                 if k.endswith("_s") or "_s_" in k]
        if ref is not None:
          parts += [f"reference/fast {rec['reference_s'] / s:.1f}x (last thread count)"]
        print(f"{size} {label:7s} {name:10s} {str(tuple(w.shape)):14s} " + ", ".join(parts))
        records.append(rec)
      line = [f"{size} {label}: one layer"]
      if not args.no_reference:
        line.append(f"reference {total['ref']:.2f} s")
      line += [f"fast (threads {t or 'default'}) {total[t]:.2f} s" for t in threads]
      line.append(f"x {n_layers} layers: " + ", ".join(
          [f"reference {total['ref'] * n_layers:.0f} s"] * (not args.no_reference)
          + [f"fast {total[t] * n_layers:.1f} s" for t in threads]))
      print("  " + "; ".join(line))
  print(f"load average after: {os.getloadavg()}")
  if args.out:
    with open(args.out, "a") as f:
      for rec in records:
        f.write(json.dumps({**rec, "cpu": cpu_model()}) + "\n")


if __name__ == "__main__":
  main()
