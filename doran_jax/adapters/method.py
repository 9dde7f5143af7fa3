"""The method registry: one record per adapter method, declaring everything about it.

A method module (lora.py, dora.py, ...) ends with `register(Method(...))`. The core derives leaf
shapes from the declared logical axes, `doran_jax.sharding` derives their specs, `peft_io` reads
the PEFT mapping, and the train step chains the optional training-time transformation after the
optimizer. A new method is one file plus its tests.

Logical axes of a leaf: 'in' and 'out' (the target kernel's input / output features, sharded as
the kernel is), 'rank' (the stored rank, never sharded); () is a scalar.

Example:
  >>> m = method.get("dora")
  >>> m.leaf_axes(cfg)
  {'lora_a': ('in', 'rank'), 'lora_b': ('rank', 'out'), 'magnitude': ('out',)}
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple, Optional

from doran_jax.errors import ConfigError

AXES = ("in", "out", "rank")


class Training(NamedTuple):
  """What a method adds to training.

  Attributes:
    transform: an optax GradientTransformation over the trainable tree {'params', 'adapters'},
      chained after the optimizer; its state lives in opt_state (checkpointed, NaN-guarded).
    regularizer: (adapters, step) -> scalar added to the loss.
    summary: (host adapters) -> dict of end-of-run results (e.g. live ranks).

  Example:
    >>> Training(regularizer=lambda adapters, step: 0.0).transform is None
    True
  """

  transform: Any = None
  regularizer: Optional[Callable[[Any, Any], Any]] = None
  summary: Optional[Callable[[Any], dict]] = None


@dataclasses.dataclass(frozen=True)
class Method:
  """One adapter method.

  Attributes:
    name: the `AdapterConfig.method` value.
    leaf_axes: cfg -> {leaf name: logical axes} of the leaves at each target's module.
    init_leaves: (key, w0_IxO, cfg) -> leaves.
    low_rank: (leaves, generated, cfg) -> (A (in, r), B (r, out)).
    gain: (norm_O, leaves, cfg, key, train) -> per-output gain; None when W' = W0 + s·A·B.
    generator: a module with init(key, targets, cfg) and generate(params, targets, cfg) ->
      {target path: (A, B)} whose params live in adapters['hypernet'] (DoRAN), or None.
    uses_generator: cfg -> whether this config uses `generator` (DoRAN's `generator` switch).
    stored_rank: cfg -> the rank of the stored factors.
    peft_factors: (w0_IxO, leaves, A, B, cfg) -> (A, B, PEFT magnitude or None) as numpy; None
      when the method cannot be exported to PEFT.
    peft_fields: (cfg, {module: rank}) -> LoRA config fields (r, lora_alpha, use_dora, ...).
    training: (cfg, method config section or None, num_steps) -> Training; None for none.
    has_adapters: False for the baselines that add no adapter ('full', 'frozen').
    trains_backbone: True when every backbone parameter is trainable ('full').
    recipe: the training recipe of the method's reference implementation as dotted config keys
      ({'adapter.alpha': 8.0, 'optim.weight_decay': 0.01, ...}); config_lib.apply_arg applies it
      to a config file's values, below the config argument and command-line flags.

  Example:
    >>> m = get("dora")
    >>> m.needs_norm, m.has_adapters, sorted(m.leaf_axes(None))
    (True, True, ['lora_a', 'lora_b', 'magnitude'])
  """

  name: str
  leaf_axes: Callable[[Any], Mapping[str, tuple]] = lambda cfg: {}
  init_leaves: Optional[Callable] = None
  low_rank: Optional[Callable] = None
  gain: Optional[Callable] = None
  generator: Any = None
  uses_generator: Callable[[Any], bool] = lambda cfg: True
  stored_rank: Callable[[Any], int] = lambda cfg: cfg.rank
  peft_factors: Optional[Callable] = None
  peft_fields: Optional[Callable] = None
  training: Optional[Callable[[Any, Any, int], Training]] = None
  has_adapters: bool = True
  trains_backbone: bool = False
  recipe: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def needs_norm(self) -> bool:
    """Whether W' is rescaled per output unit (a `gain`: DoRA, DoRAN), so needs the norm of V.

    Example:
      >>> get("lora").needs_norm, get("doran").needs_norm
      (False, True)
    """
    return self.gain is not None

  def generator_for(self, cfg):
    """The generator module `cfg` uses, or None.

    Example:
      >>> import doran_jax as dj
      >>> get("doran").generator_for(dj.AdapterConfig(method="doran")).__name__
      'doran_jax.adapters.hypernet'
      >>> get("doran").generator_for(dj.AdapterConfig(method="doran", generator=False)) is None
      True
    """
    return self.generator if self.generator is not None and self.uses_generator(cfg) else None


_METHODS: dict[str, Method] = {}


def register(method: Method, *, replace: bool = False) -> Method:
  """Adds `method` to the registry (replace=True to redefine one, e.g. in a notebook).

  A method module ends with this call; `AdapterConfig(method=name)` then accepts the name.

  Example:
    >>> from doran_jax.adapters import lora
    >>> m = register(Method(name="my_lora", leaf_axes=lambda cfg: lora.LEAF_AXES,
    ...                     init_leaves=lora.init_leaves, low_rank=lora.low_rank))
    >>> "my_lora" in names()
    True
    >>> unregister("my_lora")
  """
  if method.name in _METHODS and not replace:
    raise ValueError(f"adapter method {method.name!r} is registered twice.")
  _METHODS[method.name] = method
  return method


def unregister(name: str) -> None:
  """Removes a registered method (no error if absent); for tests and notebooks.

  Example:
    >>> unregister("my_lora")
    >>> "my_lora" in names()
    False
  """
  _METHODS.pop(name, None)


def names() -> tuple[str, ...]:
  """The registered method names, in registration order (`doran_jax.METHODS` at import).

  Example:
    >>> names()[:4]
    ('lora', 'dora', 'doran', 'dyndora')
  """
  return tuple(_METHODS)


def get(name: str) -> Method:
  """The method registered as `name`; a ConfigError listing the registered ones otherwise.

  Example:
    >>> get("dyndora").recipe["adapter.alpha"]
    8.0
    >>> get("qlora")
    Traceback (most recent call last):
      ...
    doran_jax.errors.ConfigError: unknown method 'qlora'; choose one of lora, dora, doran, ...
  """
  if name not in _METHODS:
    raise ConfigError(f"unknown method {name!r}; choose one of {', '.join(_METHODS)}.")
  return _METHODS[name]


def leaf_shape(axes: tuple, d_in: int, d_out: int, rank: int) -> tuple[int, ...]:
  """The shape of a leaf with logical `axes` at a (d_in, d_out) kernel and stored `rank`.

  Example:
    >>> leaf_shape(("in", "rank"), 384, 1536, 8), leaf_shape((), 384, 1536, 8)
    ((384, 8), ())
  """
  sizes = {"in": d_in, "out": d_out, "rank": rank}
  for a in axes:
    if a not in sizes:
      raise ValueError(f"unknown logical axis {a!r}; use one of {', '.join(AXES)}.")
  return tuple(sizes[a] for a in axes)
