"""init / apply / count over the adapter pytree, dispatching to one module per method.

Every method is described by three pure functions over one target's leaves:
  low_rank(leaves, generated, cfg) -> (A (in, r), B (r, out))
  gain(norm_O, leaves, cfg, key, train) -> per-output-unit gain g (out,) or None
  init_leaves(key, w0_IxO, cfg) -> leaves
and the merged weight is W' = g ⊙ (W0 + s·A·B) (g = 1 when None). The factored path
(doran_jax.adapters.factored) uses the same three functions without ever forming W'.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp

from doran_jax import hypernet
from doran_jax.adapters import dora, doran, dyndora, lora
from doran_jax.adapters.config import AdapterConfig
from doran_jax.adapters.norms import column_norm
from doran_jax.targets import SEP, Target, find_targets, flatten, unflatten

METHOD_MODULES = {"lora": lora, "dora": dora, "doran": doran, "dyndora": dyndora}
LEAF_SHAPES = {
    "lora_a": lambda t, cfg: (t.d_in, cfg.stored_rank),
    "lora_b": lambda t, cfg: (cfg.stored_rank, t.d_out),
    "magnitude": lambda t, cfg: (t.d_out,),
    "tau": lambda t, cfg: (t.d_out,) if cfg.tau_per_output else (),
    "gate": lambda t, cfg: (cfg.stored_rank,),
}
# The leaves each method's init_leaves creates at a target's module.
METHOD_LEAVES = {
    "lora": ("lora_a", "lora_b"),
    "dora": ("lora_a", "lora_b", "magnitude"),
    "doran": ("magnitude", "tau"),
    "dyndora": ("lora_a", "lora_b", "gate"),
}


def targets_for(params: Mapping[str, Any], cfg: AdapterConfig) -> list[Target]:
  """The kernels `cfg` adapts in `params`, validated (rank <= min(in, out))."""
  targets = find_targets(params, cfg.targets, cfg.transposed)
  for t in targets:
    if cfg.stored_rank > min(t.d_in, t.d_out):
      raise ValueError(
          f"rank {cfg.rank} (stored rank {cfg.stored_rank}) is larger than min(in, out) = "
          f"{min(t.d_in, t.d_out)} of {t.path!r} with shape ({t.d_in}, {t.d_out}); "
          "lower adapter.rank or narrow adapter.targets.")
  return targets


def init_adapters(key: jax.Array, params: Mapping[str, Any], cfg: AdapterConfig) -> dict:
  """Creates the trainable adapter pytree for `params`.

  Example:
    >>> cfg = AdapterConfig(method="dora", rank=8, targets=r".*/(query|value)/kernel")
    >>> adapters = init_adapters(jax.random.key(0), params, cfg)
    >>> adapters["targets"]["bert"]["encoder"]["layer"]["0"]["attention"]["self"]["query"].keys()
    dict_keys(['lora_a', 'lora_b', 'magnitude'])

  Returns:
    {'targets': tree mirroring params down to each targeted kernel's module} plus, for doran,
    {'hypernet': generator params per kernel-shape group}. Empty targets for 'full'/'frozen'.
  """
  if not cfg.has_adapters:
    return {"targets": {}}
  targets = targets_for(params, cfg)
  module = METHOD_MODULES[cfg.method]
  flat = flatten(params)
  key_targets, key_hyper = jax.random.split(key)
  keys = jax.random.split(key_targets, len(targets))
  leaves = {}
  for k, t in zip(keys, targets):
    for name, value in module.init_leaves(k, _logical(flat[t.path], t), cfg).items():
      leaves[t.module_path + SEP + name] = value
  adapters = {"targets": unflatten(leaves)}
  if cfg.method == "doran":
    adapters["hypernet"] = hypernet.init(key_hyper, targets, cfg)
  return adapters


def _logical(w, t: Target):
  return w.T if t.transposed else w


def _module_leaves(adapter_targets: Mapping[str, Any], t: Target, cfg: AdapterConfig) -> dict:
  node = adapter_targets
  for part in t.module_path.split(SEP):
    if not isinstance(node, Mapping) or part not in node:
      raise ValueError(
          f"adapters do not fit these params: no adapter for target {t.path!r} (missing "
          f"{part!r}). Were they made with another targets regex or for another model?")
    node = node[part]
  want_names = METHOD_LEAVES[cfg.method]
  if not isinstance(node, Mapping) or set(node) != set(want_names):
    have = sorted(node) if isinstance(node, Mapping) else type(node).__name__
    raise ValueError(
        f"adapter leaves at {t.module_path!r} are {have} but method {cfg.method!r} uses "
        f"{list(want_names)}; were the adapters made with another adapter.method?")
  for name, leaf in node.items():
    want = LEAF_SHAPES[name](t, cfg) if name in LEAF_SHAPES else None
    if want is not None and tuple(leaf.shape) != tuple(want):
      raise ValueError(
          f"adapter leaf {t.module_path}/{name} has shape {tuple(leaf.shape)} but {t.path!r} "
          f"with rank {cfg.stored_rank} needs {tuple(want)}; check adapter.rank and the model.")
  return node


def target_factors(params: Mapping[str, Any], adapters: Mapping[str, Any], cfg: AdapterConfig):
  """Per-target (Target, leaves, A, B) after hypernetwork generation; shared by merged and factored."""
  targets = targets_for(params, cfg)
  generated = {}
  if cfg.method == "doran":
    if "hypernet" not in adapters:
      raise ValueError("doran adapters need adapters['hypernet']; these were made for another method.")
    generated = hypernet.generate(adapters["hypernet"], targets, cfg)
  _check_no_extra_targets(adapters["targets"], targets, cfg)
  module = METHOD_MODULES[cfg.method]
  out = []
  for t in targets:
    leaves = _module_leaves(adapters["targets"], t, cfg)
    a_IxR, b_RxO = module.low_rank(leaves, generated.get(t.path), cfg)
    out.append((t, leaves, a_IxR, b_RxO))
  return out


def _check_no_extra_targets(adapter_targets: Mapping[str, Any], targets: list[Target],
                            cfg: AdapterConfig) -> None:
  # Adapters for modules the regex no longer matches would otherwise be dropped without a word.
  wanted = {t.module_path for t in targets}
  have = {p.rsplit(SEP, 1)[0] for p in flatten(adapter_targets)}
  extra = sorted(have - wanted)
  if extra:
    raise ValueError(
        f"adapters hold {len(extra)} module(s) that targets regex {cfg.targets!r} does not match "
        f"in these params, e.g. {extra[:3]}; were they made with other adapter.targets or for "
        "another model?")


def target_key(rng: Optional[jax.Array], index: int) -> Optional[jax.Array]:
  return None if rng is None else jax.random.fold_in(rng, index)


def apply_adapters(params: Mapping[str, Any], adapters: Mapping[str, Any], cfg: AdapterConfig, *,
                   rng: Optional[jax.Array] = None, train: bool = False) -> dict:
  """Returns the effective params W' (same structure as `params`) that the unmodified model consumes.

  `train=False` is deterministic and equals the merged weights of an exported model. DoRAN's noise
  in train mode is drawn from `rng` (one fold per target).

  Example:
    >>> eff = apply_adapters(params, adapters, cfg, rng=key, train=True)
    >>> logits = model(**batch, params=eff).logits
  """
  if not cfg.has_adapters:
    return params
  if train and cfg.dropout > 0:
    raise ValueError(f"adapter dropout {cfg.dropout} cannot be applied to merged weights; use "
                     "mode='factored' (doran_jax.adapters.factored.adapted_apply) or dropout=0.")
  module = METHOD_MODULES[cfg.method]
  flat = flatten(params)
  for i, (t, leaves, a_IxR, b_RxO) in enumerate(target_factors(params, adapters, cfg)):
    w0 = flat[t.path]
    v_IxO = _logical(w0, t).astype(jnp.float32) + cfg.scale * (
        a_IxR.astype(jnp.float32) @ b_RxO.astype(jnp.float32))
    if module.NEEDS_NORM:
      g_O = module.gain(column_norm(v_IxO, cfg.norm_eps), leaves, cfg, target_key(rng, i), train)
      v_IxO = v_IxO * g_O[None, :]
    flat[t.path] = _logical(v_IxO, t).astype(w0.dtype)
  return unflatten(flat)


def count_params(adapters: Mapping[str, Any]) -> int:
  """Number of trainable scalars in an adapter (or any) pytree."""
  return int(sum(x.size for x in jax.tree_util.tree_leaves(adapters)))
