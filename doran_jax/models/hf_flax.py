"""Loading transformers 4.57's Flax model classes (the last line that has them).

This is the one module that touches those classes; `doran_jax.models` wraps what it returns in a
`Backbone`. It goes when our own Flax families replace them.
"""

from __future__ import annotations

import os
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import traverse_util

from doran_jax.targets import SEP


def auto_class(task: str):
  import transformers
  classes = {
      "classification": transformers.FlaxAutoModelForSequenceClassification,
      "image_classification": transformers.FlaxAutoModelForImageClassification,
      "causal_lm": transformers.FlaxAutoModelForCausalLM,
      "features": transformers.FlaxAutoModel,
  }
  return classes[task]


def _has_flax_weights(path: str) -> bool:
  return os.path.isdir(path) and any(f.startswith("flax_model") for f in os.listdir(path))


def load(path: str, hf_config, task: str, *, dtype, seed: int = 0):
  """(model, params, fresh paths): the pretrained weights, the rest initialised from `seed`.

  PyTorch-only checkpoints are converted from safetensors (no torch needed).
  """
  from_pt = os.path.isdir(path) and not _has_flax_weights(path)
  model = auto_class(task).from_pretrained(path, config=hf_config, from_pt=from_pt, dtype=dtype,
                                           seed=seed)
  params = _plain(model.params)
  return model, params, _fresh_paths(model, params, seed)


def _fresh_paths(model, params, seed: int) -> tuple[str, ...]:
  """The parameters from_pretrained initialised itself (the checkpoint lacked them).

  transformers 4.57 only logs them, so they are found as the leaves equal to its random init
  with `seed` that a second seed changes; a module with one fresh leaf counts as fresh whole
  (its zero-initialised bias matches any seed).
  """
  init = jax.jit(model.init_weights, static_argnums=1)
  flat = traverse_util.flatten_dict(params, sep=SEP)
  first = traverse_util.flatten_dict(_plain(init(jax.random.PRNGKey(seed), model.input_shape)), sep=SEP)
  second = traverse_util.flatten_dict(_plain(init(jax.random.PRNGKey(seed + 1), model.input_shape)),
                                      sep=SEP)
  fresh_modules = {p.rsplit(SEP, 1)[0] for p, v in flat.items()
                   if np.array_equal(v, first[p]) and not np.array_equal(first[p], second[p])}
  return tuple(sorted(p for p in flat if p.rsplit(SEP, 1)[0] in fresh_modules))


def random(hf_config, task: str, *, dtype, seed: int = 0):
  """(model, params): a randomly initialised model from a transformers config."""
  model = auto_class(task).from_config(hf_config, seed=seed, dtype=dtype)
  return model, _plain(model.params)


def _plain(tree):
  if hasattr(tree, "items"):
    return {k: _plain(v) for k, v in tree.items()}
  return jnp.asarray(tree)


def detect_transposed_kernels(model, params, inputs: dict) -> tuple[str, ...]:
  """Finds the kernels stored as (out, in) by watching each module's call on real inputs.

  Every module with a 2-D 'kernel' is intercepted; its output (bias removed) is compared with
  x·K and x·Kᵀ. GPT-2's Conv1D kernels come out as transposed, nn.Dense kernels do not. The
  model runs once under `jax.jit`, so there is no compile per parameter.
  """
  found = {}

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    module = context.module
    if context.method_name != "__call__" or not args or not module.has_variable("params", "kernel"):
      return out
    kernel = module.get_variable("params", "kernel")
    x = args[0]
    if getattr(kernel, "ndim", 0) != 2 or not hasattr(x, "shape") or not hasattr(out, "shape"):
      return out
    y = jnp.asarray(out, jnp.float32)
    if module.has_variable("params", "bias"):
      y = y - jnp.asarray(module.get_variable("params", "bias"), jnp.float32)
    x = jnp.asarray(x, jnp.float32)
    k = jnp.asarray(kernel, jnp.float32)
    errors = {}
    if k.shape[0] == x.shape[-1] and k.shape[1] == y.shape[-1]:
      errors[False] = jnp.max(jnp.abs(x @ k - y))
    if k.shape[1] == x.shape[-1] and k.shape[0] == y.shape[-1]:
      errors[True] = jnp.max(jnp.abs(x @ k.T - y))
    if errors:
      found[SEP.join(module.scope.path) + SEP + "kernel"] = errors
    return out

  def probe(p):
    found.clear()
    with nn.intercept_methods(interceptor):
      model(**inputs, params=p)
    return dict(found)

  errors = jax.jit(probe)(params)
  transposed = []
  for path, by_layout in errors.items():
    by_layout = {k: float(v) for k, v in by_layout.items()}
    if min(by_layout, key=by_layout.get):
      transposed.append(path)
  return tuple(sorted(transposed))


def dummy_inputs(hf_config, batch: int = 2, seq: int = 8, seed: int = 0) -> dict:
  """Random model inputs matching the config (pixel_values NCHW for vision models)."""
  rng = np.random.default_rng(seed)
  if hasattr(hf_config, "image_size") and hasattr(hf_config, "num_channels"):
    size = hf_config.image_size
    return {"pixel_values": rng.normal(size=(batch, hf_config.num_channels, size, size))
            .astype(np.float32)}
  return {"input_ids": rng.integers(1, hf_config.vocab_size, size=(batch, seq)).astype(np.int32)}


def enable_remat(model) -> None:
  """Rematerialises every transformer block in the backward pass (transformers' own nn.remat)."""
  if not hasattr(model, "enable_gradient_checkpointing"):
    raise ValueError(f"{type(model).__name__} has no gradient checkpointing; set model.remat=False.")
  model.enable_gradient_checkpointing()
