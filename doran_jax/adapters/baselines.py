"""The baselines that add no adapter: 'full' (train every parameter) and 'frozen' (head only)."""

from __future__ import annotations

from doran_jax.adapters.method import Method, register

FULL = register(Method(name="full", has_adapters=False, trains_backbone=True))
FROZEN = register(Method(name="frozen", has_adapters=False))
