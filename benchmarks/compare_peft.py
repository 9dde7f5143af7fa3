#!/usr/bin/env python3
r"""Side-by-side CPU step times against Hugging Face PEFT, alternating the two in one sitting.

  python benchmarks/compare_peft.py                      # MiniLM, batch 32, seq 128, q+v, rank 8
  python benchmarks/compare_peft.py --model bert-base --steps 10 --rounds 1
  python benchmarks/compare_peft.py --model llama-512    # causal LM, batch 4 x 256, r16, all 7 linears
  python benchmarks/compare_peft.py --model llama-smollm2 --steps 10

Runs `benchmarks/step.py` (ours, each method in its own process) and a PEFT reference script
(torch 2.13.0 CPU + peft 0.21.2 from requirements-parity.txt): `../shared/bench/peft_step.py`
for the BERT-like models (minilm, bert-base), `benchmarks/peft_causal_step.py` for the
LLaMA-shaped causal LMs (benchmarks/llama_shapes.py), alternating ours/theirs per method and
round, and prints the CPU, the medians, peak RSS and the ratios the fast-path issue asks for.
Batch, sequence, rank and targets default per model (MODEL_DEFAULTS); flags override them.
`--matmul-probe` adds our step's matmul breakdown (benchmarks/matmul_probe.py) to each of our
runs and prints it. Needs the parity extra installed.
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
PEFT_CAUSAL_SCRIPT = REPO / "benchmarks" / "peft_causal_step.py"
sys.path.insert(0, str(REPO))

from benchmarks import llama_shapes, matmul_probe  # noqa: E402

# Per model: (PEFT script, its --model name, defaults for batch, seq, rank, targets).
BERT_DEFAULTS = dict(batch=32, seq=128, rank=8, targets="query,value")
LLAMA_DEFAULTS = dict(batch=4, seq=256, rank=16, targets="all")
MODEL_DEFAULTS = {
    "minilm": (PEFT_SCRIPT, "minilm", BERT_DEFAULTS),
    "bert-base": (PEFT_SCRIPT, "bert-base-random", BERT_DEFAULTS),
    **{name: (PEFT_CAUSAL_SCRIPT, name, LLAMA_DEFAULTS) for name in llama_shapes.LLAMA_SHAPES},
}
# The PEFT scripts' target_modules for our --targets presets.
PEFT_TARGETS = {("bert", "query,value"): "query,value",
                ("bert", "all"): "query,key,value,dense",
                ("llama", "query,value"): "query,value", ("llama", "all"): "all"}
GOAL = 0.75   # ours dora (and doran) / PEFT dora, issue 33


def run(cmd):
  # This checkout's doran_jax and benchmarks, not whichever copy is installed.
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(
      [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
  if proc.returncode:
    raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default="minilm", choices=sorted(MODEL_DEFAULTS))
  p.add_argument("--batch", type=int, default=None, help="default per model (MODEL_DEFAULTS)")
  p.add_argument("--seq", type=int, default=None)
  p.add_argument("--rank", type=int, default=None)
  p.add_argument("--targets", default=None, help="query,value | all")
  p.add_argument("--answer-tokens", type=int, default=0,
                 help="causal LM: the loss on each row's last N tokens only, both sides (an SFT "
                      "step; ours computes the LM head there only)")
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--rounds", type=int, default=2)
  p.add_argument("--mode", default="factored")
  p.add_argument("--methods", default="lora,dora,doran")
  p.add_argument("--matmul-probe", action="store_true",
                 help="our runs also time their own matmul shapes alone (step.py --matmul-probe)")
  p.add_argument("--json-out", default=None)
  args = p.parse_args(argv)
  script, peft_model, defaults = MODEL_DEFAULTS[args.model]
  for k, v in defaults.items():
    if getattr(args, k) is None:
      setattr(args, k, v)
  if not script.exists():
    raise SystemExit(f"{script} is missing (../shared/bench holds the BERT one).")
  family = "llama" if script == PEFT_CAUSAL_SCRIPT else "bert"
  cpu = matmul_probe.cpu_model()
  print(f"CPU {cpu!r}, {os.cpu_count()} cores; {args.model}, batch {args.batch}, seq {args.seq}, "
        f"rank {args.rank}, targets {args.targets}", flush=True)
  common = ["--batch", str(args.batch), "--seq", str(args.seq), "--rank", str(args.rank),
            "--steps", str(args.steps)]
  if args.answer_tokens:
    if family != "llama":
      raise SystemExit("--answer-tokens is for the causal-LM models (llama-*).")
    common += ["--answer-tokens", str(args.answer_tokens)]
  results = {}
  for _ in range(args.rounds):
    for method in args.methods.split(","):
      ours = run([sys.executable, "benchmarks/step.py", "--method", method, "--model", args.model,
                  "--mode", args.mode, "--targets", args.targets, *common,
                  *(["--matmul-probe"] if args.matmul_probe else [])])
      results.setdefault(("ours", method), []).append(ours)
      print(f"  ours {method}: {ours['median_step_s']:.3f} s", flush=True)
      if method in ("lora", "dora", "full", "frozen"):
        theirs = run([sys.executable, str(script), "--method", method, "--model", peft_model,
                      "--targets", PEFT_TARGETS.get((family, args.targets), args.targets),
                      "--no-flop-count", *common])
        results.setdefault(("peft", method), []).append(theirs)
        print(f"  PEFT {method}: {theirs['median_step_s']:.3f} s", flush=True)
  table = {k: {"median_step_s": statistics.median(r["median_step_s"] for r in v),
               "peak_rss_mb": max(r["peak_rss_mb"] for r in v)} for k, v in results.items()}
  print(f"\n{args.model}, batch {args.batch}, seq {args.seq}, rank {args.rank}, targets "
        f"{args.targets}, {args.rounds} rounds x {args.steps} steps (median of medians), "
        f"CPU {cpu!r}, {os.cpu_count()} cores\n")
  print("| impl | method | median step s | peak RSS MB |")
  print("|---|---|---|---|")
  for (impl, method), r in sorted(table.items()):
    print(f"| {impl} | {method} | {r['median_step_s']:.3f} | {r['peak_rss_mb']:.0f} |")
  t = {k: v["median_step_s"] for k, v in table.items()}
  if ("peft", "dora") in t:
    for m in ("dora", "doran"):
      if ("ours", m) in t:
        print(f"\nours {m} / PEFT dora = {t[('ours', m)] / t[('peft', 'dora')]:.2f} (goal <= {GOAL})")
  if ("ours", "lora") in t and ("ours", "dora") in t:
    print(f"ours dora / ours lora = {t[('ours', 'dora')] / t[('ours', 'lora')]:.2f} (target <= 1.10)")
  if ("ours", "doran") in t and ("ours", "dora") in t:
    print(f"ours doran / ours dora = {t[('ours', 'doran')] / t[('ours', 'dora')]:.2f} (target <= 1.10)")
  if args.matmul_probe:
    print("\n| ours | dots | GFLOP / step | ms alone | GFLOP/s alone |")
    print("|---|---|---|---|---|")
    for (impl, method), rs in sorted(results.items()):
      if impl != "ours" or "matmul_by_kind" not in rs[0]:
        continue
      med = lambda f: statistics.median(f(r) for r in rs)  # noqa: E731
      for k in rs[0]["matmul_by_kind"]:
        print(f"| {method} | {k} | {med(lambda r: r['matmul_by_kind'][k]['gflop']):.1f} | "
              f"{med(lambda r: r['matmul_by_kind'][k]['ms_alone']):.0f} | "
              f"{med(lambda r: r['matmul_by_kind'][k]['gflops']):.1f} |")
      print(f"| {method} | all | {med(lambda r: r['matmul_flops_per_step']) / 1e9:.1f} | "
            f"{med(lambda r: r['matmul_s_alone']) * 1e3:.0f} | {med(lambda r: r['matmul_gflops']):.1f} |")
      print(f"| {method} | step | | {med(lambda r: r['median_step_s']) * 1e3:.0f} "
            f"(beyond the dots alone: {med(lambda r: r['beyond_matmul_s']) * 1e3:.0f}; "
            f"fraction_of_matmul {med(lambda r: r['fraction_of_matmul']):.2f}) | |")
  if args.json_out:
    with open(args.json_out, "w") as f:
      json.dump({f"{i}/{m}": v for (i, m), v in results.items()}, f, indent=1)


if __name__ == "__main__":
  main()
