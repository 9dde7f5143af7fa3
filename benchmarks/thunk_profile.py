r"""Where a compiled CPU step spends its time: XLA:CPU's per-thunk trace, grouped by what it computes.

`profile(compiled, args, steps)` runs the compiled function under `jax.profiler.trace`, reads the
Perfetto trace, and sums each thunk's time per step, grouped by (forward | backward, the model
scope it comes from with layer numbers folded, e.g. 'attention/self', the thunk's kind, e.g.
'dot' or 'transpose_copy_fusion'). Scopes come from the op names in the compiled HLO.

Caveat: XLA:CPU may hand a large dot to its thread pool and return, so such dots' thunk time
undercounts them; elementwise fusions and small batched dots (attention) are timed in full. The
sum of thunk times is printed next to the step's wall time for that reason.

  python benchmarks/step.py --method dora --profile 3      # the table after the JSON line
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import tempfile
import time

import jax

# Runtime bookkeeping events, not thunks.
_SKIP = ("$", "Pjit", "Common", "end:", "Slinky", "Thunk", "Threadpool", "Python", "Allocate",
         "Handle", "Parse", "Wait")


def _scopes(hlo_text: str) -> dict[str, tuple[str, str]]:
  """instruction name -> (pass, scope) from the compiled HLO's op_name metadata."""
  out = {}
  for line in hlo_text.splitlines():
    m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = .*op_name=\"([^\"]+)\"", line)
    if not m:
      continue
    name, op = m.groups()
    backward = "transpose(" in op
    op = re.sub(r"jit\([^)]*\)/|jvp\(|transpose\(|\)", "", op)
    op = re.sub(r"/\d+/", "/N/", op)
    parts = [p for p in op.split("/") if p and not p.startswith(("jit", "closed_call"))]
    scope = "/".join(parts[-4:-1]) if len(parts) > 1 else (parts[0] if parts else "?")
    out[name] = ("backward" if backward else "forward", scope)
  return out


def profile(compiled, args: tuple, steps: int = 3) -> dict:
  """{'wall_s', 'thunk_s', 'rows': [(pass, scope, kind, seconds per step), ...]} sorted by time.

  `compiled(*args)` must return (new first argument, anything): a train step whose state is
  donated is fed its own output, as the trainer does.
  """
  scopes = _scopes(compiled.as_text())
  with tempfile.TemporaryDirectory() as tmp:
    state, rest = args[0], args[1:]
    t0 = time.perf_counter()
    with jax.profiler.trace(tmp, create_perfetto_trace=True):
      for _ in range(steps):
        state, out = compiled(state, *rest)
        jax.block_until_ready((state, out))
    wall = (time.perf_counter() - t0) / steps
    (path,) = glob.glob(os.path.join(tmp, "**", "*perfetto_trace.json.gz"), recursive=True)
    with gzip.open(path) as f:
      trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  totals = collections.Counter()
  for e in events:
    if e.get("ph") != "X" or e["name"].startswith(_SKIP):
      continue
    kind = re.sub(r"\.\d+$", "", e["name"])
    pass_, scope = scopes.get(e["name"], ("?", "?"))
    totals[(pass_, scope, kind)] += e.get("dur", 0.0) * 1e-6 / steps
  rows = [(*k, v) for k, v in totals.most_common()]
  return {"wall_s": wall, "thunk_s": sum(totals.values()), "rows": rows}


def markdown(result: dict, top: int = 25) -> str:
  """The profile as a markdown table (top rows, with each row's share of the thunk total)."""
  lines = [f"step wall {result['wall_s']:.3f} s; sum of thunk times {result['thunk_s']:.3f} s "
           "(large dots may run outside their thunk: see benchmarks/thunk_profile.py)", "",
           "| pass | scope | thunk kind | ms / step | share |", "|---|---|---|---|---|"]
  for pass_, scope, kind, s in result["rows"][:top]:
    lines.append(f"| {pass_} | {scope} | {kind} | {1e3 * s:.1f} | {s / result['thunk_s']:.1%} |")
  return "\n".join(lines)
