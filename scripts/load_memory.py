r"""Loading memory of a LLaMA-shaped checkpoint: host RSS and bytes per device, bf16, FSDP on 8 devices.

  python scripts/load_memory.py --size 7b        # writes runs/llama7b_random (13.5 GB), then loads it
  python scripts/load_memory.py --size 1b --devices 8 --out docs/results/load_memory_1b.json
  python scripts/load_memory.py --size 1b --quantize nf4 --out docs/results/load_memory_1b_nf4.json

Step 1 writes a checkpoint of random bf16 weights in transformers' names, in shards of about
2 GB, one shard in memory at a time (no model is ever built for it). Step 2, in a fresh process
with `--devices` simulated CPU devices, loads it with `models.load_backbone(..., param_dtype=
"bfloat16", mesh=fsdp:N, sharding_rules="fsdp")` and reports the peak host RSS, the bytes each
device holds and the analytic sizes. Simulated CPU devices live in host memory, so the RSS
includes the placed model itself; on accelerators that part is on the devices.

`--quantize int8|nf4` (`--double-quant` for nf4's 8-bit block scales) loads with
`model.quantize`: every frozen Dense kernel but lm_head quantised on the host as it is read. The
analytic bytes are kernels x bits/8 (doran_jax.quant.analytic_bits: codes, scales and the kept
column norms) plus the other tensors in bf16.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

SIZES = {
    "7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=32),
    "1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
               num_attention_heads=32, num_key_value_heads=4),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2),
}


def layer_tensors(cfg: dict, i: int) -> dict[str, tuple]:
  d, f = cfg["hidden_size"], cfg["intermediate_size"]
  hd = d // cfg["num_attention_heads"]
  kv = cfg["num_key_value_heads"] * hd
  p = f"model.layers.{i}."
  return {p + "self_attn.q_proj.weight": (d, d), p + "self_attn.k_proj.weight": (kv, d),
          p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.o_proj.weight": (d, d),
          p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d),
          p + "mlp.down_proj.weight": (d, f), p + "input_layernorm.weight": (d,),
          p + "post_attention_layernorm.weight": (d,)}


def write_checkpoint(cfg: dict, folder: str, shard_bytes: float = 2e9, seed: int = 0) -> float:
  """Random bf16 weights in shards + index + config.json; returns the bytes written."""
  import ml_dtypes
  from safetensors.numpy import save_file
  os.makedirs(folder, exist_ok=True)
  rng = np.random.default_rng(seed)
  d, v = cfg["hidden_size"], cfg["vocab_size"]
  groups = [{"model.embed_tokens.weight": (v, d)}]
  groups += [layer_tensors(cfg, i) for i in range(cfg["num_hidden_layers"])]
  groups += [{"model.norm.weight": (d,), "lm_head.weight": (v, d)}]
  weight_map, shard, size, n, total = {}, {}, 0, 0, 0.0

  def flush():
    nonlocal shard, size, n
    if shard:
      name = f"model-{n:05d}.safetensors"
      save_file(shard, os.path.join(folder, name), metadata={"format": "pt"})
      weight_map.update({k: name for k in shard})
      shard, size, n = {}, 0, n + 1

  for group in groups:
    for name, shape in group.items():
      x = rng.standard_normal(shape, np.float32) * 0.02 if len(shape) == 2 else np.ones(shape, np.float32)
      shard[name] = x.astype(ml_dtypes.bfloat16)
      size += shard[name].nbytes
      total += shard[name].nbytes
    if size >= shard_bytes:
      flush()
  flush()
  with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {"total_size": int(total)}, "weight_map": weight_map}, f)
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump({"model_type": "llama", "architectures": ["LlamaForCausalLM"], "torch_dtype": "bfloat16",
               "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
               **cfg}, f, indent=2)
  return total


def analytic_bytes(folder: str, quantize: str, double_quant: bool) -> tuple[int, int]:
  """(parameter count, analytic resident bytes) from the checkpoint's shapes alone."""
  import re
  from doran_jax import quant
  from doran_jax.models import KEEP_FLOAT
  with open(os.path.join(folder, "model.safetensors.index.json")) as f:
    names = json.load(f)["weight_map"]
  from safetensors import safe_open
  n, total = 0, 0.0
  for file in sorted(set(names.values())):
    with safe_open(os.path.join(folder, file), framework="np") as f:
      for name in f.keys():
        shape = f.get_slice(name).get_shape()
        size = int(np.prod(shape))
        n += size
        ours = name.replace(".", "/").replace("/weight", "/kernel")
        dense = len(shape) == 2 and "embed_tokens" not in name and not re.fullmatch(KEEP_FLOAT, ours)
        if quantize != "none" and dense:
          total += size * quant.analytic_bits(quantize, double_quant=double_quant,
                                              d_in=shape[1], d_out=shape[0]) / 8
        else:
          total += 2 * size
  return n, int(total)


def load_and_measure(folder: str, devices: int, quantize: str = "none",
                     double_quant: bool = False) -> dict:
  import jax
  from doran_jax import models, quant, sharding
  t0 = time.time()
  mesh = sharding.make_mesh(f"data:1,fsdp:{devices},model:1")
  bb = models.load_backbone(folder, "causal_lm", param_dtype="bfloat16", mesh=mesh,
                            sharding_rules="fsdp", quantize=quantize, double_quant=double_quant)
  jax.block_until_ready(bb.params)
  load_s = time.time() - t0
  per_device = {}
  total = 0
  for leaf in jax.tree_util.tree_leaves(bb.params):
    total += leaf.nbytes
    for s in leaf.addressable_shards:
      per_device[str(s.device)] = per_device.get(str(s.device), 0) + s.data.nbytes
  n_params, analytic = analytic_bytes(folder, quantize, double_quant)
  return {"devices": devices, "quantize": quantize, "double_quant": double_quant,
          "params": int(n_params), "load_s": load_s,
          "param_bytes": int(total), "analytic_param_bytes": analytic,
          "bf16_bytes": int(2 * n_params), "float32_bytes": int(4 * n_params),
          "max_device_bytes": max(per_device.values()), "min_device_bytes": min(per_device.values()),
          "peak_host_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
          "quantized_kernels": sum(quant.is_quantized(x) for x in jax.tree_util.tree_leaves(
              bb.params, is_leaf=quant.is_quantized)),
          "dtypes": sorted({str(x.dtype) for x in jax.tree_util.tree_leaves(bb.params)})}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--size", choices=sorted(SIZES), default="7b")
  p.add_argument("--folder", default=None, help="checkpoint folder (default runs/llama<size>_random)")
  p.add_argument("--devices", type=int, default=8)
  p.add_argument("--out", default=None, help="write the JSON result here")
  p.add_argument("--quantize", choices=["none", "int8", "nf4"], default="none",
                 help="store the frozen Dense kernels quantised (model.quantize)")
  p.add_argument("--double-quant", action="store_true", help="nf4: 8-bit block scales")
  p.add_argument("--load-only", action="store_true", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  folder = args.folder or os.path.join("runs", f"llama{args.size}_random")
  if args.load_only:
    print("RESULT " + json.dumps(load_and_measure(folder, args.devices, args.quantize,
                                                  args.double_quant)))
    return
  if not os.path.exists(os.path.join(folder, "model.safetensors.index.json")):
    t = time.time()
    written = write_checkpoint(SIZES[args.size], folder)
    print(f"wrote {written / 2**30:.2f} GiB to {folder} in {time.time() - t:.0f} s", flush=True)
  env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={args.devices}",
         "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, __file__, "--size", args.size, "--folder", folder,
                         "--devices", str(args.devices), "--quantize", args.quantize, "--load-only"]
                        + (["--double-quant"] if args.double_quant else []), env=env,
                        capture_output=True, text=True)
  if proc.returncode:
    raise SystemExit(proc.stdout[-2000:] + proc.stderr[-3000:])
  result = json.loads([l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1][7:])
  result["size"] = args.size
  gib = 2.0**30
  print(f"{args.size} ({args.quantize}{'+dq' if args.double_quant else ''}): "
        f"{result['params'] / 1e9:.2f} B params; resident {result['param_bytes'] / gib:.3f} GiB "
        f"(analytic {result['analytic_param_bytes'] / gib:.3f}; bf16 would be "
        f"{result['bf16_bytes'] / gib:.2f} GiB); per device {result['max_device_bytes'] / gib:.3f} "
        f"GiB max over {args.devices} (1/{args.devices} = "
        f"{result['param_bytes'] / args.devices / gib:.3f}); peak host RSS "
        f"{result['peak_host_rss_bytes'] / gib:.2f} GiB; load {result['load_s']:.0f} s")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(result, f, indent=2)


if __name__ == "__main__":
  main()
