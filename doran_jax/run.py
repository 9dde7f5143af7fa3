"""Run construction: model, data, adapters, optimizer, mesh and sharded state from a config.

Shapes first, then shardings (frozen params, trainable tree and optimizer state, all derived
from the partition rules), then the state initialised directly into them. `setup` copies what
it is given and returns an immutable `Run`; training produces new states, never a new Run.

Example:
  >>> run = setup(config)                       # what train.py and the notebook call
  >>> run.state.step, run.num_steps
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Optional

import jax
import numpy as np
import optax
from absl import logging

from doran_jax import config_lib, data, memory, models, optim, sharding, step
from doran_jax.adapters import AdapterConfig, count_params, init_adapters
from doran_jax.adapters import method as method_registry
from doran_jax.errors import ConfigError
from doran_jax.models import registry
from doran_jax.targets import flatten
from doran_jax.trainable import split_params


@dataclasses.dataclass(frozen=True, eq=False)
class Run:
  """Everything a training run needs; built by `setup`. `state` is the initial TrainState."""

  config: Any
  backbone: models.Backbone        # its params live in `frozen` and `state.trainable`
  adapter_cfg: AdapterConfig
  training: method_registry.Training
  frozen: Any
  state: step.TrainState
  tx: optax.GradientTransformation
  schedule: Callable
  mesh: Any
  train_data: Any
  eval_data: Any
  tokenizer: Any
  num_steps: int
  state_shardings: Any
  frozen_shardings: Any
  train_step: Callable             # jitted (state, frozen, batch) -> (state, metrics)

  def replace(self, **changes) -> "Run":
    return dataclasses.replace(self, **changes)


def adapter_config_from(config, transposed=(), family=None) -> AdapterConfig:
  """The AdapterConfig of config.adapter; with `family`, a target preset name ('all_linear',
  'attention') becomes that family's regex."""
  d = config.adapter.to_dict()
  if family is not None:
    d["targets"] = family.targets(d["targets"])
  return AdapterConfig(**{**d, "transposed": tuple(transposed)})


def load_tokenizer(config):
  """The text tokenizer for the model (None for image models)."""
  mc = config.model
  if mc.task == "image_classification":
    return None
  path = mc.tokenizer or ("" if mc.tiny else mc.name)
  if not path:
    raise ConfigError("a tiny text model needs config.model.tokenizer (e.g. 'minilm').")
  tokenizer = models.load_tokenizer(path)
  if tokenizer.pad_token is None:
    tokenizer.pad_token = tokenizer.eos_token
  return tokenizer


def load_model(config, num_labels: Optional[int] = None, mesh=None) -> models.Backbone:
  """The backbone named by config.model (num_labels from the data when config says 0).

  With `mesh`, a pretrained checkpoint is placed straight into the config's sharding rules.
  """
  mc = config.model
  overrides = dict(mc.config_overrides or {})
  labels = None if mc.task == "causal_lm" else (mc.num_labels or num_labels)
  kw = dict(dtype=mc.dtype, param_dtype=mc.param_dtype, seed=config.seed, remat=mc.remat,
            num_labels=labels, memory_lean=bool(mc.fused_layers), quantize=mc.quantize,
            double_quant=bool(mc.double_quant))
  if mc.tiny:
    return models.from_config(models.tiny_config(mc.tiny, **overrides), mc.task, **kw)
  return models.load_backbone(mc.name, mc.task, config_overrides=overrides, mesh=mesh,
                              sharding_rules=config.sharding_rules, **kw)


def model_family(config) -> registry.Family:
  """The family of config.model, from its config.json alone (no weights are read)."""
  mc = config.model
  if mc.tiny:
    return registry.get(mc.tiny)
  return models.family_of(models.read_config(mc.name))


def image_norm(config, backbone: Optional[models.Backbone] = None):
  """The model family's (image_mean, image_std) for image data (None for other data)."""
  if config.data.get("source", None) != "tfds_image":
    return None
  family = backbone.family if backbone is not None else model_family(config)
  if family.image_mean is None:
    raise ConfigError(f"data.source='tfds_image' needs an image model; model family "
                      f"{family.name!r} has no image preprocessing (image_mean/image_std).")
  return family.image_mean, family.image_std


def num_train_steps(config, n_train: int) -> int:
  if config.num_steps:
    return int(config.num_steps)
  return max(1, math.ceil(config.num_epochs * n_train / config.batch_size))


def head_regex(config, backbone: models.Backbone, method: method_registry.Method) -> str:
  """The trainable task head: config.head, else the family's head for the task."""
  if method.trains_backbone:
    return ""
  return backbone.family.head(config.model.task) if config.head is None else config.head


def check_fresh_params(backbone: models.Backbone, trainable_params, method) -> None:
  """A parameter initialised at load (not in the checkpoint) must be trained, or it stays random."""
  if method.trains_backbone:
    return
  trained = set(flatten(trainable_params))
  left = [p for p in backbone.fresh if p not in trained]
  if left:
    raise ConfigError(
        f"{len(left)} parameter(s) were freshly initialised at load but are not trainable, so they "
        f"would stay random: {left[:6]}. Add them to the head with config.head (a regex, e.g. "
        f"'({'|'.join(sorted({p.split('/')[0] for p in left}))})/.*') or use a checkpoint that has them.")


@jax.jit
def _run_keys(seed):
  """(init key, run key) from the seed: one compile instead of eager seed, split and unstack."""
  key_init, key_run = jax.random.split(jax.random.PRNGKey(seed))
  return key_init, key_run


def setup(config, *, backbone: Optional[models.Backbone] = None, tokenizer=None,
          with_data: bool = True) -> Run:
  """Builds model, data, adapters, optimizer, mesh and sharded state from a config.

  `backbone` and `tokenizer` are reused as given (not modified). `with_data=False` skips the
  data sets (benchmarks feed their own batches; config.num_steps and config.model.num_labels
  must then be set). The config is validated first (config_lib.validate): a bad value stops
  here, before any data or model is read.
  """
  config_lib.validate(config, with_data=with_data, with_model=backbone is None)
  config = config_lib.resolved(config)  # the per-method lr filled in (a copy)
  sharding.maybe_initialize_distributed(config.distributed)
  method = method_registry.get(config.adapter.method)
  mesh = sharding.make_mesh(config.mesh)
  train_data = eval_data = None
  if with_data:
    # Evaluation comes after training: a batch that cannot fit must stop the run now.
    memory.check_eval_batch(config, backbone.config if backbone is not None
                            else config_lib.model_config(config.model), mesh.local_devices)
    if tokenizer is None:
      tokenizer = load_tokenizer(config)
    images = dict(image_size=config.data.get("image_size", None),
                  image_norm=image_norm(config, backbone))
    train_data = data.load_dataset(config.data, "train", tokenizer=tokenizer, **images)
    eval_data = data.load_dataset(config.data, "eval", tokenizer=tokenizer, **images)
    if config.model.task != "causal_lm":
      # Given class counts and named classes are real even where the training split lacks them.
      declared = bool(config.model.num_labels or config.data.get("num_classes", None)
                      or train_data.label_names)
      data.check_labels(train_data, eval_data, config.model.num_labels or train_data.num_classes,
                        declared=declared)
  if backbone is None:
    backbone = load_model(config, train_data.num_classes if train_data else None, mesh)
  adapter_cfg = adapter_config_from(config, backbone.transposed, backbone.family)
  num_steps = num_train_steps(config, len(train_data)) if train_data else int(config.num_steps)
  training = (method.training(adapter_cfg, config.get(method.name, None), num_steps)
              if method.training else method_registry.Training())

  trainable_params, frozen = split_params(backbone.params, method.trains_backbone,
                                          head_regex(config, backbone, method))
  check_fresh_params(backbone, trainable_params, method)

  rules = sharding.rules_for(config.sharding_rules, backbone.family)
  param_specs = sharding.param_specs(backbone.params, mesh, rules, backbone.transposed)
  frozen_specs = sharding.param_specs(frozen, mesh, rules, backbone.transposed)
  head_specs = sharding.param_specs(trainable_params, mesh, rules, backbone.transposed)
  frozen = jax.device_put(frozen, sharding.named(mesh, frozen_specs, like=frozen))
  params = jax.device_put(backbone.params, sharding.named(mesh, param_specs, like=backbone.params))

  key_init, key_run = _run_keys(config.seed)
  init = functools.partial(init_adapters, cfg=adapter_cfg)
  abstract_adapters = jax.eval_shape(init, key_init, params)
  adapter_specs = sharding.adapter_specs(abstract_adapters, params, param_specs, adapter_cfg, mesh)
  adapters = jax.jit(init, out_shardings=sharding.named(mesh, adapter_specs))(key_init, params)
  del params
  trainable = {"params": jax.device_put(trainable_params, sharding.named(mesh, head_specs)),
               "adapters": adapters}
  logging.info("trainable: %d adapter + %d head/backbone parameters (%s)", count_params(adapters),
               count_params(trainable_params), adapter_cfg.method)

  tx, schedule = optim.make_optimizer(config.optim, num_steps, trainable, config.freeze,
                                      after=training.transform)
  trainable_shardings = jax.tree_util.tree_map(lambda x: x.sharding, trainable)
  opt_shardings = optimizer_shardings(tx, trainable, mesh)
  opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(trainable)
  replicated = sharding.named(mesh, jax.sharding.PartitionSpec())
  # Every leaf starts on the mesh, so the first step's inputs already have the shardings it
  # returns and the step compiles once.
  state = step.TrainState(step=jax.device_put(np.zeros((), np.int32), replicated),
                          trainable=trainable, opt_state=opt_state,
                          rng=jax.device_put(key_run, replicated))
  state_shardings = step.TrainState(step=replicated, trainable=trainable_shardings,
                                    opt_state=opt_shardings, rng=replicated)
  frozen_shardings = jax.tree_util.tree_map(lambda x: x.sharding, frozen)
  backbone = backbone.replace(params=None)  # a copy: the caller's backbone keeps its params
  train_step = step.make_train_step(
      backbone, adapter_cfg, tx, training, mesh=mesh, state_shardings=state_shardings,
      frozen_shardings=frozen_shardings,
      accum_steps=int(config.optim.accum_steps))
  return Run(config=config, backbone=backbone, adapter_cfg=adapter_cfg, training=training,
             frozen=frozen, state=state, tx=tx, schedule=schedule, mesh=mesh,
             train_data=train_data, eval_data=eval_data, tokenizer=tokenizer,
             num_steps=num_steps, state_shardings=state_shardings,
             frozen_shardings=frozen_shardings, train_step=train_step)


def with_optimizer(run: Run, **optim_changes) -> Run:
  """`run` with its optimizer, schedule and compiled step rebuilt under changed optim values.

  The state keeps its shapes, so `run.state` and the workdir's checkpoints still fit. The
  changed values are not validated: tests and the probe script use it to feed a value such as
  lr=nan past validation into the step.

  Example:
    >>> run = with_optimizer(setup(config), lr=float("nan"))
  """
  config = run.config.copy_and_resolve_references()
  with config.unlocked():
    config.optim.update(optim_changes)
  tx, schedule = optim.make_optimizer(config.optim, run.num_steps, run.state.trainable,
                                      config.freeze, after=run.training.transform)
  train_step = step.make_train_step(
      run.backbone, run.adapter_cfg, tx, run.training, mesh=run.mesh,
      state_shardings=run.state_shardings, frozen_shardings=run.frozen_shardings,
      accum_steps=int(config.optim.accum_steps))
  return run.replace(config=config, tx=tx, schedule=schedule, train_step=train_step)


def optimizer_shardings(tx, trainable, mesh):
  """Optimizer-state shardings derived from the trainable tree's, before any state exists."""
  known = {path: (leaf.shape, leaf.sharding) for path, leaf in flatten(trainable).items()}
  return sharding.state_shardings_like(jax.eval_shape(tx.init, trainable), known, mesh)
