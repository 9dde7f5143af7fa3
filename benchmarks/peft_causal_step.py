#!/usr/bin/env python3
r"""PEFT's side of a LLaMA-shaped causal-LM training step on the CPU: one JSON line.

  python benchmarks/peft_causal_step.py --method dora --model llama-512 --batch 4 --seq 256 \
      --rank 16 --targets all

The causal-LM counterpart of ../shared/bench/peft_step.py (BERT/MiniLM), timed the same way:
transformers' LlamaForCausalLM built from the same LlamaConfig as benchmarks/step.py's model
(benchmarks/llama_shapes.py) with random init (torch.manual_seed), peft LoraConfig(r, lora_alpha,
target_modules, lora_dropout, use_dora=(method == 'dora')), torch AdamW over the trainable
params, float32, labels = input_ids (transformers shifts them), attention_mask all ones, random
token ids from a fixed-seed generator (a small pool of batches, cycled). A step is forward (with
the loss) + backward + AdamW.step() + zero_grad(set_to_none=True) under one time.perf_counter();
the median over `--steps` steps after `--warmup` untimed ones. torch's intra-op threads: all
cores (or --threads), OMP/MKL threads set to match before torch is imported, as peft_step.py
does. Progress goes to stderr; stdout gets one JSON line with the keys compare_peft.py reads
(median_step_s, peak_rss_mb) and more.

Methods: lora, dora (PEFT adapters on the targets; embeddings, norms and the LM head frozen),
full (every parameter trained), frozen (nothing trained but the LM head; a forward-only lower
bound for the backbone).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from llama_shapes import ALL_LINEARS, LLAMA_SHAPES  # noqa: E402


def log(*a):
  print(*a, file=sys.stderr, flush=True)


def n_cores() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


def cpu_name() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor()


def peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def targets(spec: str) -> list[str]:
  if spec == "all":
    return list(ALL_LINEARS)
  if spec == "query,value":
    return ["q_proj", "v_proj"]
  return [t.strip() for t in spec.split(",") if t.strip()]


def analytic_flops(shape: dict, method: str, batch: int, seq: int, rank: int, n_targets: int):
  """Matmul FLOPs of one step (2 per multiply-add), counted as benchmarks/step.py's
  `model_flops` does: forward × 2 for adapter methods (input gradients through every block)."""
  d, layers, f = shape["hidden_size"], shape["num_hidden_layers"], shape["intermediate_size"]
  kv = shape["num_key_value_heads"] * (d // shape["num_attention_heads"])
  linear = 2 * d * d + 2 * d * kv + 3 * d * f
  forward = 2 * batch * seq * (layers * (linear + 2 * seq * d) + d * shape["vocab_size"])
  return forward * {"frozen": 1.0, "full": 3.0}.get(method, 2.0)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--method", choices=["lora", "dora", "full", "frozen"], required=True)
  p.add_argument("--model", default="llama-512", choices=sorted(LLAMA_SHAPES))
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--seq", type=int, default=256)
  p.add_argument("--rank", type=int, default=16)
  p.add_argument("--alpha", type=float, default=16.0)
  p.add_argument("--targets", default="all", help="all | query,value | comma-separated module names")
  p.add_argument("--dropout", type=float, default=0.0, help="lora_dropout")
  p.add_argument("--attn", default=None, choices=["eager", "sdpa"],
                 help="attn_implementation (default: transformers' default, sdpa)")
  p.add_argument("--answer-tokens", type=int, default=0,
                 help="labels -100 except each row's last N tokens (an SFT shape); 0 = every token")
  p.add_argument("--steps", type=int, default=20, help="timed steps")
  p.add_argument("--warmup", type=int, default=3, help="untimed steps before timing")
  p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: all cores)")
  p.add_argument("--lr", type=float, default=1e-4)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--n-batches", type=int, default=4, help="size of the pre-generated batch pool")
  p.add_argument("--no-flop-count", action="store_true",
                 help="accepted for compare_peft.py's sake; this script counts FLOPs analytically only")
  p.add_argument("--tag", default=None)
  args = p.parse_args(argv)

  threads = args.threads or n_cores()
  os.environ.setdefault("OMP_NUM_THREADS", str(threads))
  os.environ.setdefault("MKL_NUM_THREADS", str(threads))
  import torch
  import transformers
  import peft

  torch.set_num_threads(threads)
  log(f"[peft_causal_step] torch {torch.__version__} transformers {transformers.__version__} "
      f"peft {peft.__version__} threads {torch.get_num_threads()} {args.method} {args.model}")
  shape = LLAMA_SHAPES[args.model]
  kwargs = dict(shape)
  if args.attn is not None:
    kwargs["attn_implementation"] = args.attn
  torch.manual_seed(args.seed)
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kwargs)).float()
  names = targets(args.targets)
  if args.method in ("lora", "dora"):
    cfg = peft.LoraConfig(r=args.rank, lora_alpha=args.alpha, target_modules=names,
                          lora_dropout=args.dropout, use_dora=args.method == "dora",
                          task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, cfg)
  elif args.method == "frozen":
    for n, w in model.named_parameters():
      w.requires_grad_(n.startswith("lm_head."))
  model.train()
  trainable = [w for w in model.parameters() if w.requires_grad]
  opt = torch.optim.AdamW(trainable, lr=args.lr)

  gen = torch.Generator().manual_seed(args.seed)
  batches = []
  for _ in range(max(1, args.n_batches)):
    ids = torch.randint(1, min(30000, shape["vocab_size"]), (args.batch, args.seq), generator=gen)
    labels = ids.clone()
    if args.answer_tokens:   # an SFT row: transformers ignores label -100 (the prompt)
      labels[:, :-args.answer_tokens] = -100
    batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
  gc.collect()

  steps, fwd_t, bwd_t, opt_t, losses = [], [], [], [], []
  total = args.warmup + args.steps
  for i in range(total):
    b = batches[i % len(batches)]
    t0 = time.perf_counter()
    out = model(**b)
    loss = out.loss
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    opt.step()
    opt.zero_grad(set_to_none=True)
    t3 = time.perf_counter()
    del out
    lv = float(loss.detach())
    del loss
    losses.append(lv)
    if i >= args.warmup:
      steps.append(t3 - t0)
      fwd_t.append(t1 - t0)
      bwd_t.append(t2 - t1)
      opt_t.append(t3 - t2)
    log(f"[peft_causal_step] step {i + 1}/{total}{' (warmup)' if i < args.warmup else ''}: "
        f"{t3 - t0:.4f}s (fwd {t1 - t0:.4f} bwd {t2 - t1:.4f} opt {t3 - t2:.4f}) loss {lv:.4f}")

  med = statistics.median(steps)
  flops = analytic_flops(shape, args.method, args.batch, args.seq, args.rank, len(names))
  base = model.get_base_model() if hasattr(model, "get_base_model") else model
  result = {
      "bench": "peft_causal_step", "impl": "peft", "tag": args.tag, "model": args.model,
      "method": args.method, "batch": args.batch, "seq": args.seq, "answer_tokens": args.answer_tokens,
      "rank": args.rank if args.method in ("lora", "dora") else None, "alpha": args.alpha,
      "targets": ",".join(names), "dtype": "float32",
      "attn_implementation": getattr(base.config, "_attn_implementation", None),
      "threads": torch.get_num_threads(), "steps": args.steps, "warmup": args.warmup,
      "trainable_params": sum(w.numel() for w in trainable),
      "total_params": sum(w.numel() for w in model.parameters()),
      "median_step_s": med, "min_step_s": min(steps), "mean_step_s": statistics.fmean(steps),
      "median_fwd_s": statistics.median(fwd_t), "median_bwd_s": statistics.median(bwd_t),
      "median_opt_s": statistics.median(opt_t), "examples_per_s": args.batch / med,
      "tokens_per_s": args.batch * args.seq / med, "peak_rss_mb": peak_rss_mb(),
      "flops_analytic": flops, "achieved_gflops": flops / med / 1e9,
      "loss_first": losses[0], "loss_last": losses[-1], "step_s": [round(s, 5) for s in steps],
      "versions": {"python": platform.python_version(), "torch": torch.__version__,
                   "transformers": transformers.__version__, "peft": peft.__version__},
      "cpu": cpu_name(), "cores": n_cores(),
  }
  print(json.dumps(result), flush=True)
  return result


if __name__ == "__main__":
  main()
