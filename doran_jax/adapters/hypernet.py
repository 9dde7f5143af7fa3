"""DoRAN's shared hypernetwork: one generator per kernel-shape group, vmapped over target embeddings.

Per group of targets with the same (in, out) kernel shape:
  e_t            learnable embedding of target t, shape (d_emb,)
  h_t = act(W1·e_t + b1)            W1 shared by every target of the group
  A_t = reshape(h_t·Wa + ba, (in, r)),  B_t = reshape(h_t·Wb + bb, (r, out))
with Wb = bb = 0 at init, so B = 0 and W' = W0 at step 0. `jax.vmap(generate_one)(E)` yields every
A and B of the group in one call. With share='block' the generator params are stacked per
transformer block and gathered per target, then vmapped together with the embeddings.
"""

from __future__ import annotations

import collections
from typing import Sequence

import jax
import jax.numpy as jnp

from doran_jax.errors import CheckpointError
from doran_jax.targets import Target, flatten

ACTIVATIONS = {"tanh": jnp.tanh, "gelu": jax.nn.gelu, "relu": jax.nn.relu, "silu": jax.nn.silu}


def group_targets(targets: Sequence[Target]) -> dict[str, list[Target]]:
  """Targets grouped by logical kernel shape, each group in path order."""
  groups = collections.defaultdict(list)
  for t in targets:
    groups[t.shape_key].append(t)
  return dict(sorted(groups.items()))


def _blocks(group: Sequence[Target]) -> list[int]:
  return sorted({t.block for t in group})


def _init_generator(key, d_emb, hidden, d_in, d_out, rank):
  key_w1, key_a = jax.random.split(key)
  # A's head is scaled so each A_t has entries of order 1/sqrt(in), like LoRA's init.
  std_a = 1.0 / jnp.sqrt(d_in * hidden)
  return {
      "w1": jax.random.normal(key_w1, (d_emb, hidden), jnp.float32) / jnp.sqrt(d_emb),
      "b1": jnp.zeros((hidden,), jnp.float32),
      "head_a": {
          "kernel": std_a * jax.random.normal(key_a, (hidden, d_in * rank), jnp.float32),
          "bias": jnp.zeros((d_in * rank,), jnp.float32),
      },
      "head_b": {
          "kernel": jnp.zeros((hidden, rank * d_out), jnp.float32),
          "bias": jnp.zeros((rank * d_out,), jnp.float32),
      },
  }


def _generator_shapes(cfg, d_in, d_out, n_targets, n_blocks) -> dict:
  """Shapes _init_generator (and init) produce, to tell a mismatched config from a shape error."""
  stack = (n_blocks,) if cfg.share == "block" else ()
  e, h, r = cfg.hyper_emb_dim, cfg.hyper_hidden, cfg.rank
  return {
      "embeddings": (n_targets, e),
      "w1": stack + (e, h),
      "b1": stack + (h,),
      "head_a": {"kernel": stack + (h, d_in * r), "bias": stack + (d_in * r,)},
      "head_b": {"kernel": stack + (h, r * d_out), "bias": stack + (r * d_out,)},
  }


def _check_group(name, p, group, cfg) -> None:
  want = _generator_shapes(cfg, group[0].d_in, group[0].d_out, len(group), len(_blocks(group)))
  want_flat = flatten(want)  # tuples are leaves to flatten_dict
  have_flat = flatten(p)
  if set(have_flat) != set(want_flat):
    raise CheckpointError(
        f"adapters['hypernet'][{name!r}] has leaves {sorted(have_flat)} but a DoRAN "
        f"generator has {sorted(want_flat)}.")
  for leaf, shape in want_flat.items():
    got = tuple(have_flat[leaf].shape)
    if got != shape:
      raise CheckpointError(
          f"adapters['hypernet'][{name!r}]/{leaf} has shape {got} but {len(group)} targets of "
          f"shape {name} with rank={cfg.rank}, hyper_emb_dim={cfg.hyper_emb_dim}, "
          f"hyper_hidden={cfg.hyper_hidden}, share={cfg.share!r} need {shape}; use the "
          "AdapterConfig the adapters were made with.")


def init(key, targets: Sequence[Target], cfg) -> dict:
  """Generator params for every shape group: {'384x384': {'embeddings', 'w1', 'b1', 'head_a', 'head_b'}}."""
  params = {}
  for i, (name, group) in enumerate(group_targets(targets).items()):
    key_group = jax.random.fold_in(key, i)
    key_emb, key_gen = jax.random.split(key_group)
    d_in, d_out = group[0].d_in, group[0].d_out
    make = lambda k: _init_generator(k, cfg.hyper_emb_dim, cfg.hyper_hidden, d_in, d_out, cfg.rank)
    if cfg.share == "block":
      gen = jax.vmap(make)(jax.random.split(key_gen, len(_blocks(group))))
    else:
      gen = make(key_gen)
    params[name] = {
        "embeddings": jax.random.normal(key_emb, (len(group), cfg.hyper_emb_dim), jnp.float32),
        **gen,
    }
  return params


def _generate_one(e, gen, d_in, d_out, rank, act):
  h = act(e @ gen["w1"] + gen["b1"])
  a_IxR = (h @ gen["head_a"]["kernel"] + gen["head_a"]["bias"]).reshape(d_in, rank)
  b_RxO = (h @ gen["head_b"]["kernel"] + gen["head_b"]["bias"]).reshape(rank, d_out)
  return a_IxR, b_RxO


def generate(hyper_params: dict, targets: Sequence[Target], cfg) -> dict[str, tuple]:
  """Returns {kernel path: (A (in, r), B (r, out))} for every target, one vmapped call per group."""
  act = ACTIVATIONS[cfg.hyper_activation]
  out = {}
  for name, group in group_targets(targets).items():
    if name not in hyper_params:
      raise CheckpointError(
          f"adapters['hypernet'] has no generator for kernel shape {name}; "
          f"it has {sorted(hyper_params)}. Were the adapters made for other targets?")
    p = hyper_params[name]
    emb = p["embeddings"]
    if emb.shape[0] != len(group):
      raise CheckpointError(
          f"hypernet group {name} has {emb.shape[0]} embeddings but the params have "
          f"{len(group)} targets of that shape.")
    _check_group(name, p, group, cfg)
    gen = {k: v for k, v in p.items() if k != "embeddings"}
    d_in, d_out = group[0].d_in, group[0].d_out
    one = lambda e, g: _generate_one(e, g, d_in, d_out, cfg.rank, act)
    if cfg.share == "block":
      blocks = _blocks(group)
      pos = jnp.asarray([blocks.index(t.block) for t in group])
      per_target = jax.tree_util.tree_map(lambda x: x[pos], gen)
      a_NxIxR, b_NxRxO = jax.vmap(one)(emb, per_target)
    else:
      a_NxIxR, b_NxRxO = jax.vmap(one, in_axes=(0, None))(emb, gen)
    # One split per stack, whose gradient is one concatenate. Indexing each target (a[i]) made
    # the backward build a zero-padded copy of the whole stack per target and add them up: a
    # merged MiniLM DoRAN CPU step ran 1.5-2.5% slower (benchmarks/step.py, interleaved runs).
    a_split = jnp.split(a_NxIxR, len(group))
    b_split = jnp.split(b_NxRxO, len(group))
    for t, a_1xIxR, b_1xRxO in zip(group, a_split, b_split):
      out[t.path] = (a_1xIxR[0], b_1xRxO[0])
  return out
