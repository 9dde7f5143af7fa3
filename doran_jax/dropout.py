"""Dropout masks from a keyed counter-based hash: one fused elementwise pass, nothing stored.

`jax.random.bernoulli` draws threefry bits, which XLA:CPU lowers as a rolled loop whose rounds
each read and write the whole uint32 mask: on MiniLM at batch 32 × 128 tokens the attention and
hidden-state masks took about a quarter of a CPU training step (benchmarks/step.py, docs/benchmarks.md). Here
an element's bits are three rounds of a 32-bit integer mixer (C. Wellons' lowbias32) over its
index, keyed by 64 bits drawn once from the JAX key with `jax.random.bits`. XLA fuses the whole
hash into the op that consumes the mask, so a mask costs a few integer ops per element, can be
recomputed in a backward pass instead of being kept, and shards like any elementwise op (the
index comes from iotas). P(keep) is `keep_prob` to within 2⁻³².

Everything stays explicit and pure: the same key and shape give the same mask on every backend
and mesh; distinct call sites pass distinct keys (flax's `make_rng`, `jax.random.fold_in`).

Example:
  >>> keep = keep_mask(jax.random.key(0), 0.9, (32, 12, 128, 128))   # bool, ~90% True
  >>> y = apply(x, jax.random.key(1), rate=0.1)                       # x · keep / 0.9
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp

_GOLDEN = 0x9E3779B9   # odd: multiplying by it permutes uint32, and spreads a row index's bits


def seed(key: jax.Array) -> jax.Array:
  """The 64-bit hash key (uint32[2]) of a JAX PRNG key (typed or raw, any implementation)."""
  return jax.random.bits(key, (2,), jnp.uint32)


def _mix(x):
  """lowbias32: a bijection of uint32 with low bias (two multiply-xorshift rounds)."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x7FEB352D)
  x = x ^ (x >> 15)
  x = x * jnp.uint32(0x846CA68B)
  return x ^ (x >> 16)


def keep_mask_from_seed(seed_2: jax.Array, keep_prob: float, shape: Sequence[int]) -> jax.Array:
  """Bernoulli(keep_prob) bool mask of `shape` for a `seed(key)` (the form a custom VJP keeps).

  The first axis (usually the batch) keys the second round, so only the product of the other
  axes must stay below 2³²; every element within that block gets a distinct hash input.
  """
  shape = tuple(int(n) for n in shape)
  if not 0.0 <= keep_prob <= 1.0:
    raise ValueError(f"keep_prob must be in [0, 1]; got {keep_prob}.")
  if keep_prob == 1.0:
    return jnp.ones(shape, bool)
  per_row = math.prod(shape[1:])
  if per_row >= 2**32:
    raise ValueError(f"dropout mask {shape}: {per_row} elements per leading index exceed the "
                     "hash's 2^32 counter; split the array along its first axis.")
  lead = jax.lax.broadcasted_iota(jnp.uint32, shape, 0) if shape else jnp.uint32(0)
  index = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for axis in range(len(shape) - 1, 0, -1):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride)
    stride *= shape[axis]
  seed_2 = jnp.asarray(seed_2, jnp.uint32)
  x = _mix(index ^ seed_2[0])
  x = _mix(x ^ (seed_2[1] + lead * jnp.uint32(_GOLDEN)))
  x = _mix(x + seed_2[0])
  return x < jnp.uint32(min(int(round(keep_prob * 2.0**32)), 2**32 - 1))


def keep_mask(key: jax.Array, keep_prob: float, shape: Sequence[int]) -> jax.Array:
  """Bernoulli(keep_prob) bool mask of `shape` from a JAX PRNG key (True = keep).

  Example:
    >>> keep_mask(jax.random.key(0), 0.9, (4, 8)).mean()    # about 0.9
  """
  return keep_mask_from_seed(seed(key), keep_prob, shape)


def apply(x: jax.Array, key: jax.Array, rate: float) -> jax.Array:
  """Inverted dropout (PyTorch's): kept elements scaled by 1 / (1 - rate), the rest 0.

  Example:
    >>> y = apply(x, jax.random.key(0), rate=0.1)
  """
  if rate == 0.0:
    return x
  keep = keep_mask(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))
