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


def _scope(op_name: str) -> tuple[str, str]:
  """(pass, module scope) of an op_name: 'jit(step)/transpose(jvp(M))/bert/encoder/layer/4/
  attention/self/jit(_where)/select_n' -> ('backward', 'attention/self')."""
  backward = "transpose(" in op_name
  parts = [p for p in re.sub(r"\w+\(|\)", "", op_name).split("/")
           if p and not p.startswith("_") and p not in ("step", "closed_call")]
  parts = parts[:-1] or parts   # the op itself
  block = next((p for p in ("layer", "layers") if p in parts), None)
  if block:                     # per-layer ops fold into one row: the path inside the block
    i = parts.index(block)
    parts = parts[i + 2:] or parts[i:i + 1]
  return ("backward" if backward else "forward", "/".join(parts[-3:]) or "?")


def _scopes(hlo_text: str) -> dict[str, tuple[str, str]]:
  """instruction name -> (pass, scope), from its op_name or, for a fusion without one, from the
  first op_name inside the computations it calls (`calls=`, `to_apply=`)."""
  first_op, callees, computation, out, calls = {}, {}, None, {}, {}
  for line in hlo_text.splitlines():
    head = re.match(r"^(?:ENTRY )?%([\w.\-]+) ", line)
    if head and line.rstrip().endswith("{"):
      computation = head.group(1)
      continue
    m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = ", line)
    if not m:
      continue
    op = re.search(r'op_name="([^"]+)"', line)
    called = re.findall(r"(?:calls|to_apply)=%([\w.\-]+)", line)
    if computation:
      callees.setdefault(computation, []).extend(called)
    if op and "/" in op.group(1):
      out[m.group(1)] = _scope(op.group(1))
      if computation:
        first_op.setdefault(computation, out[m.group(1)])
    elif called:
      calls[m.group(1)] = called

  def resolve(comp, depth=0):
    if comp in first_op or depth > 8:
      return first_op.get(comp)
    for c in callees.get(comp, []):
      found = resolve(c, depth + 1)
      if found:
        return found
    return None

  for name, called in calls.items():
    for c in called:
      found = resolve(c)
      if found:
        out.setdefault(name, found)
        break
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


def markdown(result: dict, top: int = 30) -> str:
  """The profile as a markdown table (top rows, with each row's share of the thunk total)."""
  lines = [f"step wall {result['wall_s']:.3f} s; sum of thunk times {result['thunk_s']:.3f} s "
           "(large dots may run outside their thunk: see benchmarks/thunk_profile.py)", "",
           "| pass | scope | thunk kind | ms / step | share |", "|---|---|---|---|---|"]
  for pass_, scope, kind, s in result["rows"][:top]:
    lines.append(f"| {pass_} | {scope} | {kind} | {1e3 * s:.1f} | {s / result['thunk_s']:.1%} |")
  return "\n".join(lines)
