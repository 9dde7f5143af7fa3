"""Adapters as pure functions over parameter pytrees."""

from doran_jax.adapters.config import AdapterConfig, METHODS
from doran_jax.adapters.core import apply_adapters, count_params, init_adapters, targets_for
