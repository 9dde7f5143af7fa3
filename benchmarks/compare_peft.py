#!/usr/bin/env python3
r"""Side-by-side CPU step times against Hugging Face PEFT, alternating the two in one sitting.

  python benchmarks/compare_peft.py                      # MiniLM, batch 32, seq 128, q+v, rank 8
  python benchmarks/compare_peft.py --model bert-base --steps 10 --rounds 1

Runs `benchmarks/step.py` (ours, each method in its own process) and the PEFT reference script
`../shared/bench/peft_step.py` (torch 2.13.0 CPU + peft 0.21.2 from requirements-parity.txt),
alternating ours/theirs per method and round, and prints the medians, peak RSS and the ratios
the fast-path issue asks for. Needs the parity extra installed.
"""

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
PEFT_SCRIPT = REPO.parent / "shared" / "bench" / "peft_step.py"


def run(cmd):
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
  if proc.returncode:
    raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default="minilm", help="minilm | bert-base")
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--seq", type=int, default=128)
  p.add_argument("--rank", type=int, default=8)
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--rounds", type=int, default=2)
  p.add_argument("--mode", default="factored")
  p.add_argument("--methods", default="lora,dora,doran")
  p.add_argument("--json-out", default=None)
  args = p.parse_args(argv)
  if not PEFT_SCRIPT.exists():
    raise SystemExit(f"{PEFT_SCRIPT} is missing (it lives in ../shared/bench).")
  common = ["--batch", str(args.batch), "--seq", str(args.seq), "--rank", str(args.rank),
            "--steps", str(args.steps)]
  peft_model = {"minilm": "minilm", "bert-base": "bert-base-random"}[args.model]
  results = {}
  for _ in range(args.rounds):
    for method in args.methods.split(","):
      ours = run([sys.executable, "benchmarks/step.py", "--method", method, "--model", args.model,
                  "--mode", args.mode, *common])
      results.setdefault(("ours", method), []).append(ours)
      if method in ("lora", "dora", "full", "frozen"):
        theirs = run([sys.executable, str(PEFT_SCRIPT), "--method", method, "--model", peft_model,
                      "--no-flop-count", *common])
        results.setdefault(("peft", method), []).append(theirs)
  table = {k: {"median_step_s": statistics.median(r["median_step_s"] for r in v),
               "peak_rss_mb": max(r["peak_rss_mb"] for r in v)} for k, v in results.items()}
  cpu = next(iter(results.values()))[0].get("cpu", "unknown CPU")
  print(f"\n{args.model}, batch {args.batch}, seq {args.seq}, rank {args.rank}, {args.rounds} rounds "
        f"x {args.steps} steps (median of medians), CPU {cpu!r}, {os.cpu_count()} cores\n")
  print("| impl | method | median step s | peak RSS MB |")
  print("|---|---|---|---|")
  for (impl, method), r in sorted(table.items()):
    print(f"| {impl} | {method} | {r['median_step_s']:.3f} | {r['peak_rss_mb']:.0f} |")
  t = {k: v["median_step_s"] for k, v in table.items()}
  if ("peft", "dora") in t:
    for m in ("dora", "doran"):
      if ("ours", m) in t:
        print(f"\nours {m} / PEFT dora = {t[('ours', m)] / t[('peft', 'dora')]:.2f} (target <= 0.80)")
  if ("ours", "lora") in t and ("ours", "dora") in t:
    print(f"ours dora / ours lora = {t[('ours', 'dora')] / t[('ours', 'lora')]:.2f} (target <= 1.10)")
  if ("ours", "doran") in t and ("ours", "dora") in t:
    print(f"ours doran / ours dora = {t[('ours', 'doran')] / t[('ours', 'dora')]:.2f} (target <= 1.10)")
  if args.json_out:
    with open(args.json_out, "w") as f:
      json.dump({f"{i}/{m}": v for (i, m), v in results.items()}, f, indent=1)


if __name__ == "__main__":
  main()
