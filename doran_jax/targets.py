"""Finding the kernels an adapter config targets in a parameter pytree.

Paths are the '/'-joined keys of the params tree (``bert/encoder/layer/0/attention/self/query/kernel``).
A target is a 2-D leaf whose path fully matches ``AdapterConfig.targets``. Kernels are handled in
their *logical* (in, out) orientation; a kernel stored as (out, in) (GPT-2's Conv1D) is listed in
``AdapterConfig.transposed`` (see ``doran_jax.models.detect_transposed_kernels``).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping, Sequence

from flax import traverse_util

from doran_jax.errors import ConfigError

SEP = "/"


@dataclasses.dataclass(frozen=True)
class Target:
  """One adapted kernel.

  Attributes:
    path: '/'-joined path of the kernel leaf.
    module_path: the path with the kernel's own key dropped (where its adapter leaves live).
    d_in: logical input features.
    d_out: logical output features (the axis the DoRA norm is taken per unit of).
    transposed: True when the kernel is stored as (out, in).
    block: transformer block index (first integer path component), 0 if none.
  """

  path: str
  module_path: str
  d_in: int
  d_out: int
  transposed: bool
  block: int

  @property
  def shape_key(self) -> str:
    return f"{self.d_in}x{self.d_out}"


def flatten(tree: Mapping[str, Any]) -> dict[str, Any]:
  """Flattens a nested dict (or FrozenDict) into {'a/b/c': leaf}."""
  return traverse_util.flatten_dict(_to_dict(tree), sep=SEP)


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
  return traverse_util.unflatten_dict(dict(flat), sep=SEP)


def _to_dict(tree):
  if isinstance(tree, Mapping):
    return {k: _to_dict(v) for k, v in tree.items()}
  return tree


def _block_index(path: str) -> int:
  for part in path.split(SEP):
    if part.isdigit():
      return int(part)
  return 0


def find_targets(params: Mapping[str, Any], pattern: str,
                 transposed: Sequence[str] = ()) -> list[Target]:
  """Lists the kernels whose path fully matches `pattern`, sorted by path.

  Raises:
    ValueError: the regex is invalid, matches nothing, or matches a leaf that is not 2-D.
  """
  try:
    regex = re.compile(pattern)
  except re.error as e:
    raise ConfigError(f"targets regex {pattern!r} is not a valid regular expression: {e}") from e
  flat = flatten(params)
  transposed = frozenset(transposed)
  unknown = transposed - flat.keys()
  if unknown:
    raise ValueError(f"transposed kernels {sorted(unknown)} are not in the params tree.")
  targets = []
  for path in sorted(flat):
    if not regex.fullmatch(path):
      continue
    shape = getattr(flat[path], "shape", ())
    if len(shape) != 2:
      raise ConfigError(
          f"targets regex {pattern!r} matches {path!r} with shape {tuple(shape)}; only 2-D "
          "kernels can be adapted. Narrow the regex, e.g. end it with '/kernel'.")
    d0, d1 = shape
    is_t = path in transposed
    d_in, d_out = (d1, d0) if is_t else (d0, d1)
    module_path = path.rsplit(SEP, 1)[0] if SEP in path else ""
    targets.append(Target(path, module_path, d_in, d_out, is_t, _block_index(path)))
  if not targets:
    examples = [p for p in sorted(flat) if flat[p] is not None and
                len(getattr(flat[p], "shape", ())) == 2][:6]
    raise ConfigError(
        f"targets regex {pattern!r} matches no parameter. It must fully match a '/'-joined "
        f"path; some 2-D kernels in this tree: {examples}")
  return targets

