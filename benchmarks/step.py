#!/usr/bin/env python3
r"""Times complete jitted training steps (forward, backward, AdamW) and prints one JSON line.

  python benchmarks/step.py --method dora --model minilm --batch 32 --seq 128 --rank 8 --steps 30
  python benchmarks/step.py --method doran --model bert-base --mode factored
  python benchmarks/step.py --method dora --model minilm --quantize nf4      # QDoRA (factored)
  python benchmarks/step.py --method dora --profile 3    # + where the step's time goes

Models: minilm (the real all-MiniLM-L6-v2), bert-base (BERT-base sizes, random weights),
vit-b16 (ViT-B/16 sizes, random), llama-tiny, llama-512, llama-smollm2, llama-1b (LLaMA-shaped,
random; benchmarks/llama_shapes.py). Inputs are random token ids / pixels from a fixed seed.
Timing: after compilation, each step is timed with block_until_ready; FLOPs come from XLA's cost
analysis of the lowered step (every matmul, forward and backward, as the program computes it).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# transformers imports PyTorch whenever it is importable (the parity extra installs it), which
# costs ~280 MB of RSS and is never used here: the Flax path needs no torch.
os.environ.setdefault("USE_TORCH", "0")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from doran_jax import config_lib, models, quant, sharding  # noqa: E402
from doran_jax.data import causal  # noqa: E402
from doran_jax.adapters import count_params  # noqa: E402

from benchmarks import llama_shapes, matmul_probe, thunk_profile  # noqa: E402

from doran_jax import run as run_lib  # noqa: E402

TARGETS = {
    "bert": {"query,value": r".*/(query|value)/kernel",
             "all": r".*/(query|key|value|dense)/kernel"},
    "vit": {"query,value": r".*/(query|value)/kernel",
            "all": r".*/(query|key|value|dense)/kernel"},
    "llama": {"query,value": r".*/(q_proj|v_proj)/kernel",
              "all": r".*/(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)/kernel"},
}


def hf_config(name: str, model_dropout, attention_dropout=None):
  import transformers
  if name == "bert-base":
    cfg = transformers.BertConfig(num_labels=2)
  elif name == "vit-b16":
    cfg = transformers.ViTConfig(num_labels=100)
  elif name in llama_shapes.LLAMA_SHAPES:
    cfg = transformers.LlamaConfig(**llama_shapes.LLAMA_SHAPES[name])
  else:
    return None
  if model_dropout is not None:
    for k in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
      if hasattr(cfg, k):
        setattr(cfg, k, model_dropout)
  if attention_dropout is not None:
    for k in ("attention_probs_dropout_prob", "attention_dropout"):
      if hasattr(cfg, k):
        setattr(cfg, k, attention_dropout)
  return cfg


def family(name: str) -> str:
  return "vit" if name.startswith("vit") else "llama" if name.startswith("llama") else "bert"


def build(args):
  fam = family(args.model)
  task = {"bert": "classification", "vit": "image_classification", "llama": "causal_lm"}[fam]
  c = config_lib.base_config()
  c.model.task = task
  c.model.num_labels = 2 if fam == "bert" else 100
  c.model.dtype = args.dtype
  c.model.remat = args.remat
  c.model.fused_layers = not args.no_fused
  c.model.quantize = args.quantize
  c.model.double_quant = args.double_quant
  c.adapter = config_lib.adapter_defaults(
      method=args.method, rank=args.rank, alpha=args.alpha, mode=args.mode, dropout=args.dropout,
      targets=TARGETS[fam].get(args.targets, args.targets))
  c.num_steps = args.steps + args.warmup + 1
  c.batch_size = args.batch
  c.optim.lr = 1e-4
  c.optim.warmup_steps = 0
  c.optim.clip_norm = 0.0
  c.sharding_rules = args.sharding
  c.lock()
  dtype = jax.numpy.dtype(args.dtype)
  if args.model == "minilm":
    overrides = {}
    if args.model_dropout is not None:
      overrides = {"hidden_dropout_prob": args.model_dropout,
                   "attention_probs_dropout_prob": args.model_dropout}
    if args.attention_dropout is not None:
      overrides["attention_probs_dropout_prob"] = args.attention_dropout
    bb = models.load_backbone("minilm", task, num_labels=2, dtype=dtype, config_overrides=overrides,
                              param_dtype=args.param_dtype, quantize=args.quantize,
                              double_quant=args.double_quant, remat=args.remat,
                              memory_lean=not args.no_fused)
  else:
    cfg = hf_config(args.model, args.model_dropout, args.attention_dropout)
    if cfg is None:
      raise SystemExit(f"--model: unknown {args.model!r}")
    bb = models.from_config(cfg, task, dtype=dtype, param_dtype=args.param_dtype,
                            quantize=args.quantize, double_quant=args.double_quant,
                            remat=args.remat, memory_lean=not args.no_fused)
  run = run_lib.setup(c, backbone=bb, with_data=False)
  return run, fam


def model_flops(hf, fam: str, batch: int, seq: int, method: str,
                lm_head_positions: int = 0) -> float:
  """Analytic matmul FLOPs of one step (2 per multiply-add), MFU style.

  Forward: every linear layer plus attention scores and mixing. Backward: frozen trains only the
  head (no backward through the backbone); adapter methods need input gradients through every
  block (one more forward's worth); full fine-tuning adds the weight gradients (two more). The
  LM head counts at `lm_head_positions` a row (0: every position).
  """
  d, n_layers = hf.hidden_size, hf.num_hidden_layers
  if fam == "llama":
    kv = hf.num_key_value_heads * (d // hf.num_attention_heads)
    tokens = seq
    linear = 2 * d * d + 2 * d * kv + 3 * d * hf.intermediate_size
    extra = 2 * batch * (lm_head_positions or tokens) * d * hf.vocab_size  # lm head
  else:
    tokens = (hf.image_size // hf.patch_size) ** 2 + 1 if fam == "vit" else seq
    linear = 4 * d * d + 2 * d * hf.intermediate_size
    extra = 2 * batch * (tokens - 1) * hf.num_channels * hf.patch_size**2 * d if fam == "vit" else 0
  attention = 2 * tokens * d  # QKᵀ and AV per token (full, unmasked)
  forward = 2 * batch * tokens * n_layers * (linear + attention) + extra
  return forward * {"frozen": 1.0, "full": 3.0}.get(method, 2.0)


def batches(fam, args, n=4):
  rng = np.random.default_rng(0)
  out = []
  for _ in range(n):
    if fam == "vit":
      b = {"pixel_values": rng.normal(size=(args.batch, 3, 224, 224)).astype(np.float32),
           "labels": rng.integers(0, 100, args.batch).astype(np.int32)}
    else:
      ids = rng.integers(1, 30000, (args.batch, args.seq)).astype(np.int32)
      b = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
      if fam == "bert":
        b["token_type_ids"] = np.zeros_like(ids)
        b["labels"] = rng.integers(0, 2, args.batch).astype(np.int32)
      else:
        b["loss_mask"] = np.ones_like(ids)
        if args.answer_tokens:
          # An SFT row: the loss on its last answer_tokens tokens only, and the LM head at the
          # positions that predict them, as the causal-LM Dataset batches carry them.
          b["loss_mask"][:, :-args.answer_tokens] = 0
          k = causal.logit_positions_per_row(b["loss_mask"])
          if k is not None:
            b["logit_positions"] = causal.target_positions(b["loss_mask"], k)
    out.append(b)
  return out


def peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--method", default="dora", choices=["frozen", "lora", "dora", "doran", "dyndora", "full"])
  p.add_argument("--model", default="minilm", help="minilm | bert-base | vit-b16 | llama-tiny | llama-512 | llama-smollm2 | llama-1b")
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--seq", type=int, default=128)
  p.add_argument("--rank", type=int, default=8)
  p.add_argument("--alpha", type=float, default=16.0)
  p.add_argument("--targets", default="query,value", help="query,value | all | a regex")
  p.add_argument("--mode", default="factored", choices=["merged", "factored"])
  p.add_argument("--dropout", type=float, default=0.0, help="lora_dropout (factored mode)")
  p.add_argument("--model-dropout", type=float, default=None, help="override the backbone's dropout")
  p.add_argument("--attention-dropout", type=float, default=None,
                 help="override only the attention-probability dropout (after --model-dropout)")
  p.add_argument("--dtype", default="float32", help="compute dtype: float32 | bfloat16")
  p.add_argument("--param-dtype", default="float32", help="backbone storage dtype")
  p.add_argument("--quantize", default="none", choices=list(quant.FORMATS),
                 help="frozen Dense kernels stored int8 | nf4 (model.quantize; needs --mode factored)")
  p.add_argument("--double-quant", action="store_true", help="nf4: 8-bit block scales")
  p.add_argument("--remat", action="store_true", help="rematerialise the forward in the backward")
  p.add_argument("--no-fused", action="store_true",
                 help="plain XLA attention and GELU instead of the memory-lean custom VJPs (model.fused_layers=False)")
  p.add_argument("--sharding", default="replicated", help="replicated | fsdp | tensor_parallel")
  p.add_argument("--answer-tokens", type=int, default=0,
                 help="causal LM: the loss on each row's last N tokens only (an SFT shape), the LM "
                      "head at those positions (data.target_logits_only); 0 = every token")
  p.add_argument("--steps", type=int, default=30)
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--peak-gflops", type=float, default=None, help="machine peak to report the fraction")
  p.add_argument("--matmul-probe", action="store_true",
                 help="also time the step's own matmul shapes alone (matmul_gflops, fraction_of_matmul)")
  p.add_argument("--profile", type=int, default=0, metavar="N",
                 help="after timing, trace N more steps and print where the time goes "
                      "(benchmarks/thunk_profile.py)")
  p.add_argument("--tag", default=None)
  args = p.parse_args(argv)

  run, fam = build(args)
  host_batches = batches(fam, args)
  positions = host_batches[0].get("logit_positions")
  flops_model = model_flops(run.backbone.config, fam, args.batch, args.seq, args.method,
                            lm_head_positions=0 if positions is None else positions.shape[1])
  step_fn = run.train_step
  device_batches = [sharding.global_batch(b, run.mesh) for b in host_batches]
  state = run.state
  t0 = time.perf_counter()
  lowered = step_fn.lower(state, run.frozen, device_batches[0])
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0
  # The pre-optimisation HLO: on GPU the compiled module hides GEMMs in cuBLAS custom calls.
  cost = lowered.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get("flops", float("nan"))) if cost else float("nan")
  times, cpu_times = [], []
  for i in range(args.warmup + args.steps):
    t, c = time.perf_counter(), time.process_time()
    state, metrics = compiled(state, run.frozen, device_batches[i % len(device_batches)])
    jax.block_until_ready((state, metrics))
    if i >= args.warmup:
      times.append(time.perf_counter() - t)
      cpu_times.append(time.process_time() - c)
  median = statistics.median(times)
  result = {
      "impl": "doran_jax", "method": args.method, "model": args.model, "mode": args.mode,
      "batch": args.batch, "seq": args.seq, "answer_tokens": args.answer_tokens, "rank": args.rank, "targets": args.targets,
      "dtype": args.dtype, "fused": not args.no_fused, "device": jax.devices()[0].device_kind,
      "quantize": args.quantize + ("+dq" if args.double_quant else ""), "cpu": matmul_probe.cpu_model(),
      "frozen_param_bytes": quant.param_bytes(run.frozen),
      "n_devices": jax.device_count(),
      "median_step_s": median, "min_step_s": min(times), "examples_per_s": args.batch / median,
      # CPU seconds of all the process's threads per step: with other work on the cores, a
      # steadier measure of our own variants' work than wall time (not comparable with torch,
      # whose idle threads spin).
      "median_step_cpu_s": statistics.median(cpu_times), "min_step_cpu_s": min(cpu_times),
      "peak_rss_mb": peak_rss_mb(), "trainable_params": count_params(state.trainable),
      "compile_s": compile_s, "xla_flops_per_step": flops, "model_flops_per_step": flops_model,
      "achieved_gflops": flops_model / median / 1e9,
      "final_loss": float(metrics["loss"]), "tag": args.tag,
  }
  if args.matmul_probe:
    hf = run.backbone.config
    probe = matmul_probe.matmul_rate(lowered.as_text(), vocab=getattr(hf, "vocab_size", None),
                                     max_rank=max(64, args.rank))
    # The step's own dot FLOPs over its time, against the same dots timed alone.
    result.update(probe, step_matmul_gflops=probe["matmul_flops_per_step"] / median / 1e9)
    result["fraction_of_matmul"] = result["step_matmul_gflops"] / probe["matmul_gflops"]
    # What the step spends beyond its dots' time alone: everything else, and dots slowed down.
    result["beyond_matmul_s"] = median - probe["matmul_s_alone"]
  if jax.devices()[0].platform == "gpu":
    stats = jax.devices()[0].memory_stats() or {}
    result["peak_device_mem_mb"] = stats.get("peak_bytes_in_use", 0) / 2**20
  if args.peak_gflops:
    result["fraction_of_peak"] = result["achieved_gflops"] / args.peak_gflops
  print(json.dumps(result), flush=True)
  if args.profile:
    prof = thunk_profile.profile(compiled, (state, run.frozen, device_batches[0]), args.profile)
    print(thunk_profile.markdown(prof), flush=True)


if __name__ == "__main__":
  main()
