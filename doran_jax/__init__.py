"""doran_jax: LoRA, DoRA, DoRAN and dynamic-rank DoRA as pure functions over Flax parameter pytrees.

Example:
  >>> import doran_jax as dj
  >>> cfg = dj.AdapterConfig(method="doran", rank=8, alpha=16.0,
  ...                        targets=r".*/(query|value)/kernel")
  >>> adapters = dj.init_adapters(key, params, cfg)
  >>> eff = dj.apply_adapters(params, adapters, cfg, rng=key, train=True)
"""

from doran_jax import xla_cpu

# Before anything compiles: XLA:CPU defaults measured to train faster (doran_jax/xla_cpu.py).
xla_cpu.apply_defaults()

from doran_jax.adapters import (AdapterConfig, METHODS, apply_adapters, count_params,
                                init_adapters, targets_for)

__all__ = ["AdapterConfig", "METHODS", "apply_adapters", "count_params", "init_adapters",
           "targets_for"]
