"""One record per model family: everything the rest of the package needs to know about a family.

Models, sharding, the trainer, data and PEFT export read a family's record instead of keeping
their own tables of names. A new family is one file that calls `register(Family(...))`.

Example:
  >>> fam = registry.get("bert")
  >>> fam.heads["classification"], fam.target_presets["attention"]
  ('classifier/.*', '.*/(query|value)/kernel')
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional

import numpy as np

from doran_jax.errors import ConfigError
from doran_jax.sharding import FSDP_RULES

TASKS = ("classification", "image_classification", "causal_lm", "features")


@dataclasses.dataclass(frozen=True)
class Family:
  """What the package knows about one model family.

  Attributes:
    name: our name ('bert').
    model_types: transformers `config.model_type` values this family reads.
    tasks: supported tasks.
    heads: task -> regex of the task head's params (trained with the adapters, fresh at load).
    target_presets: name -> adapter targets regex ('attention' = query and value, 'all_linear').
    column_parallel: regex of kernels whose output axis is split over 'model'.
    row_parallel: regex of kernels whose input axis is split over 'model'.
    input_keys: task -> the batch keys the model consumes.
    tiny_config: `(**overrides)` -> a tiny random transformers config for tests.
    build: `(config dict, task, *, dtype, num_labels, remat, memory_lean)` -> our flax.linen
      module.
    prefix: config dict -> transformers' base_model_prefix ('bert', 'model', ...).
    tied_params: (config dict, task) -> (our path, source path) pairs transformers ties.
    no_transpose: regex of kernels torch already stores (in, out) (GPT-2's Conv1D).
    renames: (regex, replacement) pairs for checkpoint names that differ from the rule.
    torch_modules: (checkpoint module name, torch module name) templates for modules that
      transformers (5.x) renames when it builds the torch model, '*' standing for a layer
      index. PEFT adapters name the built model's modules, so peft_io maps through these.
    image_mean: the image processor's normalisation mean (vision families).
    image_std: its standard deviation.
    cache_shape: config dict -> (layers, key/value heads, head dim) of its KV cache (causal
      LMs that support cached generation, models.generate); None for the others.
    max_positions: config dict -> the longest input (tokens) its positions were trained for;
      None for families without a limit (ViT's patches are fixed by the image size).
    learned_positions: its position embeddings are a learned table (BERT, GPT-2): a longer
      input has no row to look up, so data.max_length above max_positions is an error. Rotary
      families (LLaMA and kin) extrapolate, so it is only a warning there.

  Example:
    >>> bert = get("bert")
    >>> bert.model_types, bert.tasks
    (('bert',), ('classification', 'features'))
  """

  name: str
  model_types: tuple[str, ...]
  tasks: tuple[str, ...]
  heads: Mapping[str, str]
  target_presets: Mapping[str, str]
  column_parallel: str
  row_parallel: str
  input_keys: Mapping[str, tuple[str, ...]]
  tiny_config: Callable[..., Any]
  build: Callable[..., Any]
  prefix: Callable[[Mapping[str, Any]], str]
  tied_params: Callable[[Mapping[str, Any], str], Any] = lambda cfg, task: ()
  no_transpose: str = r""
  renames: tuple[tuple[str, str], ...] = ()
  torch_modules: tuple[tuple[str, str], ...] = ()
  image_mean: Optional[float] = None
  image_std: Optional[float] = None
  cache_shape: Optional[Callable[[Mapping[str, Any]], tuple[int, int, int]]] = None
  max_positions: Optional[Callable[[Mapping[str, Any]], Optional[int]]] = None
  learned_positions: bool = False

  def head(self, task: str) -> str:
    """The regex of `task`'s head params ('' when the task has none); checks the task.

    Example:
      >>> get("bert").head("classification")
      'classifier/.*'
    """
    self.check_task(task)
    return self.heads.get(task, "")

  def check_task(self, task: str) -> None:
    """A ConfigError naming the supported tasks if this family cannot do `task`.

    Example:
      >>> get("vit").check_task("causal_lm")
      Traceback (most recent call last):
        ...
      doran_jax.errors.ConfigError: model family 'vit' does not support task 'causal_lm'; ...
    """
    if task not in self.tasks:
      raise ConfigError(f"model family {self.name!r} does not support task {task!r}; it supports "
                        f"{', '.join(self.tasks)}.")

  def tensor_parallel_rules(self) -> tuple:
    """(regex, PartitionSpec tuple) rules: column/row parallel kernels, then the FSDP tail.

    Example:
      >>> get("bert").tensor_parallel_rules()[0]
      ('.*/(query|key|value|intermediate/dense)/kernel', ('fsdp', 'model'))
    """
    return ((rf".*/({self.column_parallel})/kernel", ("fsdp", "model")),
            (rf".*/({self.row_parallel})/kernel", ("model", "fsdp"))) + tuple(FSDP_RULES)

  def dummy_batch(self, cfg: Mapping[str, Any], task: str, batch: int = 1, seq: int = 8) -> dict:
    """Inputs of the right shapes and dtypes for `module.init` / `jax.eval_shape`.

    Example:
      >>> batch = get("bert").dummy_batch({}, "classification", batch=2, seq=4)
      >>> sorted(batch), batch["input_ids"].shape
      (['attention_mask', 'input_ids', 'token_type_ids'], (2, 4))
    """
    out = {}
    for key in self.input_keys[task]:
      if key == "pixel_values":
        size = cfg["image_size"]
        out[key] = np.zeros((batch, cfg.get("num_channels", 3), size, size), np.float32)
      elif key == "input_ids":
        out[key] = np.full((batch, seq), 1, np.int32)
      elif key in ("attention_mask", "segment_ids"):
        out[key] = np.ones((batch, seq), np.int32)
      elif key in ("cache", "cache_index", "logit_positions"):
        # decoding state (models.generate) and the LM head's positions (data.causal): not
        # inputs to initialise from
        continue
      else:
        out[key] = np.zeros((batch, seq), np.int32)
    return out

  def targets(self, preset_or_regex: str) -> str:
    """A preset name ('attention', 'all_linear') -> its regex; anything else is a regex already.

    Example:
      >>> get("llama").targets("attention"), get("llama").targets(r".*/o_proj/kernel")
      ('.*/(q_proj|v_proj)/kernel', '.*/o_proj/kernel')
    """
    return self.target_presets.get(preset_or_regex, preset_or_regex)


_FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
  if family.name in _FAMILIES:
    raise ValueError(f"model family {family.name!r} is registered twice.")
  _FAMILIES[family.name] = family
  return family


def names() -> tuple[str, ...]:
  return tuple(sorted(_FAMILIES))


def get(name: str) -> Family:
  """The family registered as `name`."""
  if name not in _FAMILIES:
    raise ConfigError(f"unknown model family {name!r}; supported: {', '.join(names())}.")
  return _FAMILIES[name]


def model_types() -> tuple[str, ...]:
  """Every transformers `config.model_type` some registered family reads."""
  return tuple(sorted(t for f in _FAMILIES.values() for t in f.model_types))


def for_model_type(model_type: str) -> Family:
  """The family that reads transformers' `config.model_type`."""
  for family in _FAMILIES.values():
    if model_type in family.model_types:
      return family
  raise ConfigError(f"unsupported model_type {model_type!r}; supported model types: "
                    f"{', '.join(model_types())}. A new family is one file in doran_jax/models/.")
