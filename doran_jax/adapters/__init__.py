"""Adapters as pure functions over parameter pytrees; one registered record per method."""

from doran_jax.adapters import method
# Each method module registers its record on import (order: the order of `method.names()`).
from doran_jax.adapters import lora, dora, doran, dyndora, baselines  # noqa: F401,I001
from doran_jax.adapters.config import AdapterConfig
from doran_jax.adapters.core import apply_adapters, count_params, init_adapters, targets_for

METHODS = method.names()
