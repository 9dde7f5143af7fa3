#!/usr/bin/env python3
r"""Per-device memory of LLaMA-7B fine-tuning with each method, from jax.eval_shape and the shardings.

  python benchmarks/memory_estimate.py                 # markdown table: v4-32, v5e-64, 8xH100
  python benchmarks/memory_estimate.py --rank 32 --batch-per-device 1 --seq 256

Rows for a frozen base stored bf16, int8, nf4 and nf4 with double quantisation (model.quantize):
the quantised kernels' bytes are doran_jax.quant.analytic_bits / 8 per weight, sharded as their
kernel.

Nothing is materialised: the backbone, adapters and AdamW state are shapes from jax.eval_shape
(backbone stored in bf16, adapters and optimizer state in float32 as the trainer keeps them), laid
out with the trainer's FSDP partition rules on a mesh of the slice's size (all devices on 'fsdp').
Gradients take the trainable tree's bytes. Activations with per-block rematerialisation are an
analytic estimate (each block's input saved, one block's working set live): batch·seq·d·(layers·2
bytes) + one block's ~(34·d + 5·heads·seq)·batch·seq bytes (Korthikanti et al. 2022).
"""

from __future__ import annotations

import argparse
import math
import os
import types


import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from doran_jax import config_lib, models, optim, quant, sharding  # noqa: E402
from doran_jax.adapters import AdapterConfig, init_adapters  # noqa: E402
from doran_jax.targets import flatten  # noqa: E402

SLICES = {"TPU v4-32 (16 chips, 32 GiB)": (16, 32), "TPU v5e-64 (64 chips, 16 GiB)": (64, 16),
          "8x H100 (80 GiB)": (8, 80)}
TARGETS = r".*/(q_proj|k_proj|v_proj|up_proj|down_proj)/kernel"


def llama7b_shapes():
  cfg = models.tiny_config("llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                           num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                           max_position_embeddings=2048)
  bb_shapes = jax.eval_shape(
      lambda: models.from_config(cfg, "causal_lm", dtype="bfloat16", param_dtype="bfloat16").params)
  return cfg, dict(bb_shapes)


def per_device_bytes(tree, specs, mesh_shape, itemsize=None) -> float:
  """Bytes per device; `itemsize(path, leaf)` overrides a leaf's bytes per element."""
  total = 0.0
  flat_t, flat_s = flatten(tree), flatten(specs)
  for path, leaf in flat_t.items():
    spec = flat_s[path]
    shards = 1
    for axis in spec:
      for a in (axis,) if isinstance(axis, str) else (axis or ()):
        shards *= mesh_shape[a]
    size = jnp.dtype(leaf.dtype).itemsize if itemsize is None else itemsize(path, leaf)
    total += math.prod(leaf.shape) * size / shards
  return total


def quantized_itemsize(params, fmt: str, double_quant: bool):
  """model.quantize's bytes per element: quant.analytic_bits/8 for the kernels it quantises
  (codes, scales and kept column norms, split over the devices with their kernel), else the dtype's."""
  family = models.family_of({"model_type": "llama"})
  paths = models.quantized_paths(params, family, "causal_lm")

  def itemsize(path, leaf):
    if path in paths:
      return quant.analytic_bits(fmt, double_quant=double_quant, d_in=leaf.shape[0],
                                 d_out=leaf.shape[1]) / 8
    return jnp.dtype(leaf.dtype).itemsize

  return itemsize


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--rank", type=int, default=32)
  p.add_argument("--batch-per-device", type=int, default=1)
  p.add_argument("--seq", type=int, default=256)
  args = p.parse_args(argv)
  hf, params = llama7b_shapes()
  gib = 2.0**30
  rows = []
  bases = [("bf16", None)] + [(name, quantized_itemsize(params, fmt, dq)) for name, fmt, dq in
                              (("int8", "int8", False), ("nf4", "nf4", False),
                               ("nf4+dq", "nf4", True))]
  for method in ("lora", "dora", "doran", "full"):
    cfg = AdapterConfig(method=method, rank=args.rank, alpha=2.0 * args.rank, targets=TARGETS)
    adapters = jax.eval_shape(lambda p: init_adapters(jax.random.PRNGKey(0), p, cfg), params)
    trainable = {"params": params if method == "full" else {}, "adapters": adapters}
    optim_cfg = config_lib.base_config().optim
    tx, _ = optim.make_optimizer(optim_cfg, 1000, trainable)
    opt_state = jax.eval_shape(tx.init, trainable)
    for slice_name, (n, hbm) in SLICES.items():
      mesh = types.SimpleNamespace(shape={"data": 1, "fsdp": n, "model": 1})
      rules = sharding.FSDP_RULES
      frozen = {} if method == "full" else params
      frozen_specs = sharding.param_specs(frozen, mesh, rules)
      t_specs = {"params": sharding.param_specs(trainable["params"], mesh, rules),
                 "adapters": sharding.adapter_specs(adapters, params,
                                                    sharding.param_specs(params, mesh, rules), cfg, mesh)}
      train_b = per_device_bytes(trainable, t_specs, mesh.shape)
      opt_b = sum(per_device_bytes(m, t_specs, mesh.shape) for m in _moments(opt_state, trainable))
      d, layers, heads = hf.hidden_size, hf.num_hidden_layers, hf.num_attention_heads
      tokens = args.batch_per_device * args.seq
      act_b = tokens * d * 2 * layers + tokens * (34 * d + 5 * heads * args.seq)
      for base, itemsize in bases:
        if itemsize is not None and method == "full":
          continue   # a quantised base is frozen: no full fine-tuning on it
        frozen_b = per_device_bytes(frozen, frozen_specs, mesh.shape, itemsize)
        total = frozen_b + 2 * train_b + opt_b + act_b
        rows.append((method, slice_name, base, frozen_b / gib, train_b / gib, opt_b / gib,
                     act_b / gib, total / gib, hbm))
  print(f"LLaMA-7B, rank {args.rank}, targets q,k,v,up,down, per-device batch {args.batch_per_device} "
        f"x {args.seq} tokens, FSDP over all devices; GiB per device\n")
  print("| method | slice | frozen base | frozen backbone | trainable | AdamW state | "
        "activations (remat) | total (+ grads) | fits |")
  print("|---|---|---|---|---|---|---|---|---|")
  for method, name, base, fb, tb, ob, ab, total, hbm in sorted(
      rows, key=lambda r: ([b for b, _ in bases].index(r[2]), r[0] == "full")):
    print(f"| {method} | {name} | {base} | {fb:.2f} | {tb:.3f} | {ob:.3f} | {ab:.2f} | {total:.2f} | "
          f"{'yes' if total < 0.9 * hbm else 'no'} |")
  print("\nQuantised bases (model.quantize): every q/k/v/o/gate/up/down kernel at "
        "quant.analytic_bits (int8 8.0, nf4 4.5, nf4+dq 4.127 bits plus 32 bits per output unit "
        "per kept scale/column norm); embeddings, norms and lm_head stay bf16.")


def _moments(opt_state, trainable):
  """The optimizer-state subtrees shaped like the trainable tree (AdamW's mu and nu)."""
  target = jax.tree_util.tree_structure(trainable)
  found = []

  def visit(node):
    try:
      if jax.tree_util.tree_structure(node) == target:
        found.append(node)
        return
    except Exception:  # noqa: BLE001 - non-pytree leaves
      return
    if isinstance(node, (tuple, list)):
      for child in node:
        visit(child)
    elif isinstance(node, dict):
      for child in node.values():
        visit(child)
    elif hasattr(node, "_fields"):
      for child in node:
        visit(child)
    elif hasattr(node, "inner_states"):
      visit(node.inner_states)
    elif hasattr(node, "inner_state"):
      visit(node.inner_state)

  visit(opt_state)
  return found


if __name__ == "__main__":
  main()
