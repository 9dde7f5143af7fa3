"""init / apply / count over the adapter pytree, dispatching to the method's registry record.

Every method (doran_jax.adapters.method.Method) is described by three pure functions over one
target's leaves:
  low_rank(leaves, generated, cfg) -> (A (in, r), B (r, out))
  gain(norm_O, leaves, cfg, key, train) -> per-output-unit gain g (out,), or no gain at all
  init_leaves(key, w0_IxO, cfg) -> leaves
and the merged weight is W' = g ⊙ (W0 + s·A·B) (g = 1 without a gain). The factored path
(doran_jax.adapters.factored) uses the same three functions without ever forming W'.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp

from doran_jax import quant
from doran_jax.adapters import method as method_registry
from doran_jax.adapters.config import AdapterConfig
from doran_jax.adapters.norms import column_norm
from doran_jax.errors import CheckpointError, ConfigError
from doran_jax.targets import SEP, Target, find_targets, flatten, unflatten


def leaf_shapes(t: Target, cfg: AdapterConfig) -> dict[str, tuple[int, ...]]:
  """{leaf name: shape} of the adapter leaves at target `t`, from the method's logical axes."""
  axes = method_registry.get(cfg.method).leaf_axes(cfg)
  return {name: method_registry.leaf_shape(a, t.d_in, t.d_out, cfg.stored_rank)
          for name, a in axes.items()}


def targets_for(params: Mapping[str, Any], cfg: AdapterConfig) -> list[Target]:
  """The kernels `cfg` adapts in `params`, validated (rank <= min(in, out)).

  `cfg.targets` must fully match each kernel's '/'-joined path; a regex that matches nothing,
  or a rank above a kernel's min(in, out), is a ConfigError naming the value.

  Example:
    >>> from doran_jax import models
    >>> bb = models.from_config(models.tiny_config("bert"), "classification", num_labels=2)
    >>> targets = targets_for(bb.params, AdapterConfig(rank=4))    # query and value, 2 layers
    >>> len(targets), targets[0].path, (targets[0].d_in, targets[0].d_out)
    (4, 'bert/encoder/layer/0/attention/self/query/kernel', (32, 32))
    >>> targets_for(bb.params, AdapterConfig(rank=64))
    Traceback (most recent call last):
      ...
    doran_jax.errors.ConfigError: rank 64 (stored rank 64) is larger than min(in, out) = 32 of ...
  """
  targets = find_targets(params, cfg.targets, cfg.transposed)
  for t in targets:
    if cfg.stored_rank > min(t.d_in, t.d_out):
      raise ConfigError(
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
    A dict with 'targets', a tree mirroring params down to each targeted kernel's module, plus
    for doran 'hypernet', the generator params per kernel-shape group. Empty targets for
    'full'/'frozen'.
  """
  if not cfg.has_adapters:
    return {"targets": {}}
  targets = targets_for(params, cfg)
  method = method_registry.get(cfg.method)
  flat = flatten(params)
  key_targets, key_hyper = jax.random.split(key)
  keys = jax.random.split(key_targets, len(targets))
  leaves = {}
  for k, t in zip(keys, targets):
    made = method.init_leaves(k, _logical(flat[t.path], t), cfg)
    want = leaf_shapes(t, cfg)
    if set(made) != set(want):
      raise ValueError(f"method {cfg.method!r} created leaves {sorted(made)} at {t.module_path!r} "
                       f"but declares {sorted(want)} in its leaf_axes; declare every leaf.")
    for name, value in made.items():
      leaves[t.module_path + SEP + name] = value
  adapters = {"targets": unflatten(leaves)}
  generator = method.generator_for(cfg)
  if generator is not None:
    adapters["hypernet"] = generator.init(key_hyper, targets, cfg)
  return adapters


def _logical(w, t: Target):
  return w.T if t.transposed else w


def _module_leaves(adapter_targets: Mapping[str, Any], t: Target, cfg: AdapterConfig) -> dict:
  node = adapter_targets
  for part in t.module_path.split(SEP):
    if not isinstance(node, Mapping) or part not in node:
      raise CheckpointError(
          f"adapters do not fit these params: no adapter for target {t.path!r} (missing "
          f"{part!r}). Were they made with another targets regex or for another model?")
    node = node[part]
  shapes = leaf_shapes(t, cfg)
  want_names = sorted(shapes)
  if not isinstance(node, Mapping) or set(node) != set(want_names):
    have = sorted(node) if isinstance(node, Mapping) else type(node).__name__
    raise CheckpointError(
        f"adapter leaves at {t.module_path!r} are {have} but method {cfg.method!r} uses "
        f"{list(want_names)}; were the adapters made with another adapter.method?")
  for name, leaf in node.items():
    want = shapes[name]
    if tuple(leaf.shape) != tuple(want):
      raise CheckpointError(
          f"adapter leaf {t.module_path}/{name} has shape {tuple(leaf.shape)} but {t.path!r} "
          f"with rank {cfg.stored_rank} needs {tuple(want)}; check adapter.rank and the model.")
  return node


def target_factors(params: Mapping[str, Any], adapters: Mapping[str, Any], cfg: AdapterConfig):
  """Per-target (Target, leaves, A, B) after hypernetwork generation; shared by merged and factored."""
  targets = targets_for(params, cfg)
  method = method_registry.get(cfg.method)
  generated = {}
  generator = method.generator_for(cfg)
  if generator is not None:
    if "hypernet" not in adapters:
      raise CheckpointError(f"{cfg.method} adapters need adapters['hypernet']; these were made for "
                            "another method (or with generator=False).")
    generated = generator.generate(adapters["hypernet"], targets, cfg)
  elif "hypernet" in adapters:
    raise CheckpointError(f"these adapters hold a hypernetwork (adapters['hypernet']) but method "
                          f"{cfg.method!r} with generator={cfg.generator} uses none; use the "
                          "AdapterConfig the adapters were made with.")
  _check_no_extra_targets(adapters["targets"], targets, cfg)
  out = []
  for t in targets:
    leaves = _module_leaves(adapters["targets"], t, cfg)
    a_IxR, b_RxO = method.low_rank(leaves, generated.get(t.path), cfg)
    out.append((t, leaves, a_IxR, b_RxO))
  return out


def _check_no_extra_targets(adapter_targets: Mapping[str, Any], targets: list[Target],
                            cfg: AdapterConfig) -> None:
  # Adapters for modules the regex no longer matches would otherwise be dropped without a word.
  wanted = {t.module_path for t in targets}
  have = {p.rsplit(SEP, 1)[0] for p in flatten(adapter_targets)}
  extra = sorted(have - wanted)
  if extra:
    raise CheckpointError(
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
    >>> eff = apply_adapters(bb.params, adapters, cfg, rng=key, train=True)
    >>> logits = bb.apply(eff, batch, train=True, rng=dropout_key)
    >>> merged = apply_adapters(bb.params, adapters, cfg)          # train=False: the export
  """
  if not cfg.has_adapters:
    return params
  if train and cfg.dropout > 0:
    raise ConfigError(f"adapter dropout {cfg.dropout} cannot be applied to merged weights; use "
                      "mode='factored' (doran_jax.adapters.factored.adapted_apply) or dropout=0.")
  method = method_registry.get(cfg.method)
  flat = flatten(params)
  for i, (t, leaves, a_IxR, b_RxO) in enumerate(target_factors(params, adapters, cfg)):
    w0 = flat[t.path]
    if quant.is_quantized(w0):
      raise ConfigError(
          f"merged mode cannot adapt the quantised ({w0.fmt}) kernel {t.path!r}: forming "
          "W' = g ⊙ (W0 + s·A·B) needs a full-precision copy of every adapted kernel, which "
          "defeats the quantised base. Use adapter.mode='factored' (adapted_apply), or for an "
          "export dequantise first: apply_adapters(doran_jax.quant.dequantize_params(params), ...).")
    v_IxO = _logical(w0, t).astype(jnp.float32) + cfg.scale * (
        a_IxR.astype(jnp.float32) @ b_RxO.astype(jnp.float32))
    if method.needs_norm:
      g_O = method.gain(column_norm(v_IxO, cfg.norm_eps), leaves, cfg, target_key(rng, i), train)
      v_IxO = v_IxO * g_O[None, :]
    flat[t.path] = _logical(v_IxO, t).astype(w0.dtype)
  return unflatten(flat)


def count_params(adapters: Mapping[str, Any]) -> int:
  """Number of trainable scalars in an adapter (or any) pytree.

  Example:
    >>> count_params({"a": jnp.zeros((3, 4)), "b": {"c": jnp.zeros(5)}})
    17
  """
  return int(sum(x.size for x in jax.tree_util.tree_leaves(adapters)))
