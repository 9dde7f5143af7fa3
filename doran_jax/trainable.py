"""Splitting a backbone's params into the trainable part (task head, or all for 'full') and the
frozen rest, and putting them back together with the adapters applied."""

from __future__ import annotations

import re

import numpy as np
from absl import logging

from doran_jax.adapters import AdapterConfig, apply_adapters
from doran_jax.errors import ConfigError
from doran_jax.targets import flatten, unflatten


def split_params(params, trains_backbone: bool, head_regex: str):
  """(trainable params, frozen params): the head (or everything, for a method that trains the
  backbone) vs the rest. Every trainable match is logged.
  """
  if trains_backbone:
    return params, {}
  flat = flatten(params)
  regex = re.compile(head_regex) if head_regex else None
  head = {p: v for p, v in flat.items() if regex is not None and regex.fullmatch(p)}
  if head_regex and not head:
    raise ConfigError(f"head regex {head_regex!r} matches no parameter; set config.head to the "
                      "task head's paths (e.g. 'classifier/.*') or '' for none.")
  for p in sorted(head):
    logging.info("trainable head: %s %s", p, np.shape(head[p]))
  return unflatten(head), unflatten({p: v for p, v in flat.items() if p not in head})


def merge_params(frozen, trainable_params):
  return unflatten({**flatten(frozen), **flatten(trainable_params)})


def effective_params(frozen, trainable, adapter_cfg: AdapterConfig, *, rng=None, train=False):
  """The params the unmodified model consumes: backbone + head with the adapters applied.

  Example:
    >>> params = effective_params(frozen, {"params": head, "adapters": adapters}, cfg)
  """
  params = merge_params(frozen, trainable["params"])
  return apply_adapters(params, trainable["adapters"], adapter_cfg, rng=rng, train=train)
