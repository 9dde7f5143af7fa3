#!/usr/bin/env python3
r"""Times KV-cached against full-recompute greedy generation and prints one JSON line per run.

  python benchmarks/generate.py                              # the real SmolLM2-135M-Instruct
  python benchmarks/generate.py --model path/to/model.gguf --batch 1,4 --new-tokens 64
  python benchmarks/generate.py --tiny                       # a LLaMA-shaped random model

For each batch size: the same prompts (random token ids from a fixed seed, all `--prompt-len`
long, so no row stops early: EOS is off) through `models.generate.generate` (prefill, then one
cached step per token) and through the reference `models.generate.greedy_generate` (one full
forward of prompt + N tokens per new token). Compilation is timed apart from the runs (the first
call); each run is timed with block_until_ready, the median of `--repeats`. The JSON line says
whether both produced the same tokens.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# transformers imports PyTorch whenever it is importable (the parity extra); the Flax path needs
# none of it.
os.environ.setdefault("USE_TORCH", "0")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from doran_jax import models  # noqa: E402
from doran_jax.models import generate  # noqa: E402

from benchmarks import matmul_probe  # noqa: E402

# LLaMA-shaped, SmolLM2-135M's widths with fewer layers: random weights (--tiny).
TINY = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=6,
            num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
            rope_theta=100000.0, tie_word_embeddings=True, bos_token_id=None, eos_token_id=None)


def _timed(fn, repeats: int):
  """(first call's seconds, median of `repeats` further calls, last output)."""
  start = time.perf_counter()
  out = jax.block_until_ready(fn())
  first = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return first, statistics.median(times), np.asarray(out)


def run(bb, name: str, batch: int, prompt_len: int, new_tokens: int, repeats: int,
        reference: bool) -> dict:
  """One JSON record: cached (and reference) timings for one batch size."""
  rng = np.random.RandomState(0)
  ids = rng.randint(10, int(bb.config["vocab_size"]), (batch, prompt_len)).astype(np.int32)
  mask = np.ones_like(ids)
  spec = generate.cache_spec(bb)
  cached = functools.partial(generate.generate, bb, bb.params, ids, attention_mask=mask,
                             max_new_tokens=new_tokens, eos_token_id=(), bucket=prompt_len,
                             spec=spec)
  compile_s, cached_s, cached_out = _timed(cached, repeats)
  record = {"bench": "generate", "model": name, "batch": batch, "prompt_len": prompt_len,
            "new_tokens": new_tokens, "dtype": spec.dtype,
            "device": jax.devices()[0].device_kind, "cpu": matmul_probe.cpu_model(),
            "cached_s": round(cached_s, 4), "cached_first_call_s": round(compile_s, 3),
            "cached_tokens_per_s": round(batch * new_tokens / cached_s, 2)}
  if reference:
    full = jax.jit(functools.partial(generate.greedy_generate, bb.apply,
                                     max_new_tokens=new_tokens, eos_token_id=()))
    compile_s, full_s, full_out = _timed(lambda: full(bb.params, ids, mask), repeats)
    record.update({"full_recompute_s": round(full_s, 4),
                   "full_first_call_s": round(compile_s, 3),
                   "full_tokens_per_s": round(batch * new_tokens / full_s, 2),
                   "speedup": round(full_s / cached_s, 2),
                   "same_tokens": bool((full_out[:, prompt_len:] == cached_out).all())})
  return record


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--model", default="smollm2", help="smollm2 | a .gguf file | an HF folder")
  p.add_argument("--tiny", action="store_true", help="a LLaMA-shaped random model instead")
  p.add_argument("--batch", default="1,4", help="comma-separated batch sizes")
  p.add_argument("--prompt-len", type=int, default=64)
  p.add_argument("--new-tokens", type=int, default=64)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--dtype", default="float32", help="compute dtype")
  p.add_argument("--quantize", default="none", help="none | int8 | nf4")
  p.add_argument("--no-reference", action="store_true", help="time the cached path only")
  args = p.parse_args(argv)
  if args.tiny:
    name = "llama-tiny-576x6"
    bb = models.from_config(models.tiny_config("llama", **TINY), "causal_lm", dtype=args.dtype,
                            quantize=args.quantize)
  else:
    name = args.model
    bb = models.load_backbone(args.model, "causal_lm", dtype=args.dtype, quantize=args.quantize)
  for batch in (int(b) for b in args.batch.split(",")):
    record = run(bb, name, batch, args.prompt_len, args.new_tokens, args.repeats,
                 not args.no_reference)
    print(json.dumps({**record, "quantize": args.quantize}), flush=True)


if __name__ == "__main__":
  main()
