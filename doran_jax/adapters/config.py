"""AdapterConfig: everything that defines an adapter, hashable so it can be a static jit argument."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

from doran_jax.adapters import method as method_registry
from doran_jax.errors import ConfigError

MODES = ("merged", "factored")
SHARES = ("model", "block")
ACTIVATIONS = ("tanh", "gelu", "relu", "silu")
INITS = ("official", "gaussian")


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
  """Configuration of a low-rank adapter.

  Example:
    >>> cfg = AdapterConfig(method="dora", rank=8, alpha=16.0,
    ...                     targets=r".*/(query|value)/kernel")

  Attributes:
    method: a registered method (doran_jax.adapters.method): 'lora' | 'dora' | 'doran' |
      'dyndora' | 'full' | 'frozen'. 'full' and 'frozen' add no adapter (the trainer trains
      everything / only the head).
    rank: r (for dyndora the target rank; it starts from ceil(1.5 r)).
    alpha: scale numerator, s = alpha / r (alpha / sqrt(r) with rslora).
    targets: regex that must fully match the '/'-joined path of every adapted kernel.
    rslora: rank-stabilised scaling.
    dropout: lora_dropout on the adapter input (factored mode only, train only).
    mode: 'factored' (the default: adapted layers run as x·(W0 + s·A·B) with low-rank gradients,
      W' never built; see adapted_apply) or 'merged' (build W' then run the model; for a model
      whose adapted kernels are not nn.Dense calls). Same values; factored is the faster step
      (docs/benchmarks.md).
    transposed: paths of kernels stored as (out, in). Our model families store every kernel
      (in, out), GPT-2's Conv1D included, so it stays empty for them (`Backbone.transposed`).
    norm_eps: floor on the per-output-unit norm (real checkpoints have all-zero columns).
    tau_init: DoRAN's initial tau = softplus(rho0).
    tau_per_output: one tau per output unit instead of one per matrix.
    noise_std: sigma of DoRAN's log-normal noise on tau in train mode (0 = deterministic).
    detach_norm: DoRAN: stop the gradient through the norm (DoRA always detaches).
    hyper_emb_dim: DoRAN: width of each target's learnable embedding.
    hyper_hidden: DoRAN: hidden width of the shared generator.
    hyper_activation: DoRAN: generator activation.
    share: DoRAN: 'model' (one generator per kernel shape) or 'block' (one per transformer block).
    generator: DoRAN: A and B come from the shared hypernetwork; False stores static per-target
      lora_a / lora_b leaves instead (LoRA's init), i.e. DoRA plus τ (the ablation's switch).
    learn_tau: DoRAN: τ is trained; False holds τ at tau_init (no gradient reaches ρ).
    init_rank_factor: DynDoRA: r0 = ceil(init_rank_factor * rank).
    init: DynDoRA's A and B: 'official' (`torch.nn.init.kaiming_uniform_` at its defaults, as the
      official code: A ~ U(±sqrt(6/in)), B ~ U(±sqrt(6/r0))) or 'gaussian' (this library's
      earlier choice: A ~ U(±1/sqrt(in)), B ~ N(0, 0.02²)).
  """

  method: str = "lora"
  rank: int = 8
  alpha: float = 16.0
  targets: str = r".*/(query|value)/kernel"
  rslora: bool = False
  dropout: float = 0.0
  mode: str = "factored"
  transposed: tuple[str, ...] = ()
  norm_eps: float = 1e-6
  tau_init: float = 1e-2
  tau_per_output: bool = False
  noise_std: float = 0.1
  detach_norm: bool = True
  hyper_emb_dim: int = 8
  hyper_hidden: int = 8
  hyper_activation: str = "tanh"
  share: str = "model"
  generator: bool = True
  learn_tau: bool = True
  init_rank_factor: float = 1.5
  init: str = "official"

  def __post_init__(self):
    if isinstance(self.transposed, str):  # tuple("a/kernel") would split it into characters
      raise ValueError(f"transposed must be a sequence of kernel paths, got the string "
                       f"{self.transposed!r}; pass ({self.transposed!r},).")
    object.__setattr__(self, "transposed", tuple(self.transposed))
    method_registry.get(self.method)  # unknown method: a clear error listing the registered ones
    _check_choice("mode", self.mode, MODES)
    _check_choice("share", self.share, SHARES)
    _check_choice("hyper_activation", self.hyper_activation, ACTIVATIONS)
    _check_choice("init", self.init, INITS)
    if not isinstance(self.rank, int) or self.rank < 1:
      raise ConfigError(f"rank must be a positive integer, got {self.rank!r}.")
    if not 0.0 <= self.dropout < 1.0:
      raise ConfigError(f"dropout must be in [0, 1), got {self.dropout!r}.")
    if self.tau_init <= 0:
      raise ConfigError(f"tau_init must be > 0 (tau = softplus(rho) > 0), got {self.tau_init!r}.")
    if self.noise_std < 0:
      raise ConfigError(f"noise_std must be >= 0, got {self.noise_std!r}.")
    if self.init_rank_factor < 1:
      raise ConfigError(f"init_rank_factor must be >= 1, got {self.init_rank_factor!r}.")

  @property
  def has_adapters(self) -> bool:
    """False for the baselines that add no adapter ('full', 'frozen').

    Example:
      >>> AdapterConfig(method="full").has_adapters
      False
    """
    return method_registry.get(self.method).has_adapters

  @property
  def stored_rank(self) -> int:
    """Rank of the stored factors (r0 = ceil(init_rank_factor * rank) for dyndora).

    Example:
      >>> AdapterConfig(method="dyndora", rank=8).stored_rank
      12
    """
    return method_registry.get(self.method).stored_rank(self)

  @property
  def scale(self) -> float:
    """s = alpha / r (alpha / sqrt(r) with rslora), r the stored rank.

    Example:
      >>> cfg = AdapterConfig(rank=4, alpha=8.0)
      >>> cfg.scale, cfg.replace(rslora=True).scale
      (2.0, 4.0)
    """
    r = self.stored_rank
    return self.alpha / (math.sqrt(r) if self.rslora else r)

  def replace(self, **kw) -> "AdapterConfig":
    """A copy with the given fields changed (checked again, like a new config).

    Example:
      >>> AdapterConfig(method="lora", rank=8).replace(method="dora").method
      'dora'
    """
    return dataclasses.replace(self, **kw)

  def to_dict(self) -> dict[str, Any]:
    """Every field as plain Python values (`transposed` as a list), as exports store it.

    Example:
      >>> AdapterConfig(method="dora", rank=4).to_dict()["rank"]
      4
    """
    d = dataclasses.asdict(self)
    d["transposed"] = list(self.transposed)
    return d

  def to_json(self) -> str:
    """`to_dict` as indented JSON with sorted keys (the adapter export's config file).

    Example:
      >>> json.loads(AdapterConfig(method="doran", rank=4).to_json())["method"]
      'doran'
    """
    return json.dumps(self.to_dict(), indent=2, sort_keys=True)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "AdapterConfig":
    """The config of a dict such as `to_dict` writes; an unknown field is a ConfigError.

    Example:
      >>> AdapterConfig.from_dict({"method": "dora", "rank": 4}).rank
      4
      >>> AdapterConfig.from_dict({"rnak": 4})
      Traceback (most recent call last):
        ...
      doran_jax.errors.ConfigError: unknown AdapterConfig fields ['rnak']; known: [...]
    """
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - known
    if unknown:
      raise ConfigError(f"unknown AdapterConfig fields {sorted(unknown)}; known: {sorted(known)}")
    return cls(**d)

  @classmethod
  def from_json(cls, text: str) -> "AdapterConfig":
    """The inverse of `to_json`.

    Example:
      >>> cfg = AdapterConfig(method="doran", rank=4, noise_std=0.0)
      >>> AdapterConfig.from_json(cfg.to_json()) == cfg
      True
    """
    return cls.from_dict(json.loads(text))


def _check_choice(name, value, choices):
  if value not in choices:
    raise ConfigError(f"unknown {name} {value!r}; choose one of {', '.join(choices)}.")
