#!/usr/bin/env python3
r"""Trainable parameters per method on the real all-MiniLM-L6-v2, printed as a markdown table.

  python benchmarks/param_counts.py                       # query+value, rank 8
  python benchmarks/param_counts.py --rank 16 --targets all
"""

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402

import doran_jax as dj  # noqa: E402
from doran_jax import models  # noqa: E402
from doran_jax.trainable import split_params  # noqa: E402

TARGETS = {"query,value": r".*/(query|value)/kernel", "all": r".*/(query|key|value|dense)/kernel"}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--rank", type=int, default=8)
  p.add_argument("--targets", default="query,value", help="query,value | all | a regex")
  args = p.parse_args(argv)
  bb = models.load_backbone("minilm", "classification", num_labels=2)
  head, _ = split_params(bb.params, "frozen", r"classifier/.*")
  n_head = dj.count_params(head)
  rows = []
  for label, method, extra in [("lora", "lora", {}), ("dora", "dora", {}),
                               ("doran (share=model)", "doran", {}),
                               ("doran (share=block)", "doran", {"share": "block"}),
                               ("dyndora (stored r0)", "dyndora", {})]:
    cfg = dj.AdapterConfig(method=method, rank=args.rank, targets=TARGETS.get(args.targets, args.targets),
                           **extra)
    adapters = dj.init_adapters(jax.random.key(0), bb.params, cfg)
    rows.append((label, dj.count_params(adapters)))
  n_targets = len(dj.targets_for(bb.params, cfg))
  live = sum(args.rank * (t.d_in + t.d_out + 1) for t in dj.targets_for(bb.params, cfg))
  rows.append((f"dyndora (at budget r={args.rank})", live))
  rows.append(("full", dj.count_params(bb.params) - n_head))
  rows.append(("frozen", 0))
  print(f"MiniLM-L6 ({n_targets} targets: {args.targets}), rank {args.rank}; the classifier head "
        f"({n_head:,} parameters) is trained by every method and not counted.\n")
  print("| method | trainable adapter parameters | vs lora |")
  print("|---|---|---|")
  lora = rows[0][1]
  for label, n in rows:
    print(f"| {label} | {n:,} | {n / lora:.2f}x |")


if __name__ == "__main__":
  main()
