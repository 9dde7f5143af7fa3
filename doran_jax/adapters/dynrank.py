r"""DynDoRA's dynamic rank allocation (Mao et al., ACL 2024, arXiv 2405.17357).

Each adapted kernel holds r0 rank-1 components, ΔW = s·A·diag(c)·B (doran_jax.adapters.dyndora).
During training the globally least important components are switched off (c_i = 0) until, on
average, `rank` live components per target remain. Everything here is a pure function over the
adapter pytree and a small state dict, run inside the jitted train step as an optax
transformation chained after the optimizer (`pruning`), so the state lives in opt_state:

  >>> tx = optax.chain(optimizer, pruning(adapter_cfg, dyn_cfg, num_steps))
  >>> loss = task_loss + regularizer(adapters, step, num_steps, dyn_cfg)

Choices (checked against the authors' code, github.com/MIkumikumi0116/DoRA, Finetune_Utils.py):
- Importance of component i: s_i = ‖c_i·a_i·b_iᵀ‖_F / (‖A·diag(c)·B‖_F + 1e-8), without the
  scale α/r0 (as the reference; it cancels in the ratio except against the 1e-8), smoothed by an
  EMA s̄ ← β·s̄ + (1 − β)·s from s̄ = 0, updated after every optimizer step until pruning ends
  (also before it starts), then frozen.
- Schedule: with t = optimizer steps done, start = ⌊prune_start·N⌋, end = ⌊prune_end·N⌋,
  P = end − start and p = t − start, a prune happens when 0 <= p <= P and (p % prune_interval
  == 0 or p == P). It switches off k = ⌊n·f⌋ of all n components, f = ((r0 − r)/r0)·(p/P)³:
  one global threshold τ = the k-th smallest EMA importance, and every component with s̄_i <= τ
  is pruned (ties included, so slightly more than k can go). k = 0 prunes nothing (the reference
  prunes at least one component at every prune step via kthvalue(max(k, 1)); we follow the
  formula instead, so the pruned fraction before start and at p = 0 is exactly 0).
- Between prunes a switched-off gate is left to the optimizer: its gradient is not masked, so it
  may revive and compete again at the next prune (as in the reference). The prune at p = P fixes
  the final mask, which is re-applied after every later step, so pruned gates stay exactly 0.
- Regulariser (the reference's form and sign, added to the loss): η·mean of the unbiased
  variances Var(A[:, i]) (over the input features) and Var(B[i, :]) (over the output features),
  taken over all 2·n of them, i.e. η/2 · mean_i (Var(A_i) + Var(B_i)); active for the steps up to
  and including the one that triggers the last prune, 0 afterwards.
- The state (`PruningState`, or the dict of `init_state`) = {"importance": tree, "mask": tree, "budget": int32 scalar}: the trees mirror
  adapters["targets"] down to each target's module with a (r0,) leaf there (mask: 1 live, 0 pruned
  at the last prune), and budget = rank·n_targets live components kept at the end. Fixed
  structure and dtypes, so orbax checkpoints it with the rest of the TrainState.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from doran_jax.errors import CheckpointError, ConfigError
from doran_jax.targets import SEP, flatten, unflatten

EPS = 1e-8
GATE = "gate"


# ----------------------------------------------------------------------------------- schedule

@dataclasses.dataclass(frozen=True)
class Schedule:
  """The pruning window in optimizer steps (static Python numbers, resolved from the config).

  Attributes:
    start: t at which p = 0 (⌊prune_start·num_steps⌋).
    end: t of the last prune, which fixes the final mask (⌊prune_end·num_steps⌋, at least 1).
    interval: prune every `interval` steps of p (and always at p = span).
    ema_beta: β of the importance EMA.
    eta: weight of the variance regulariser.
  """

  start: int
  end: int
  interval: int
  ema_beta: float
  eta: float

  @property
  def span(self) -> int:
    return self.end - self.start


def schedule(num_steps: int, dyn_cfg) -> Schedule:
  """Resolves and validates `config.dyndora` for a run of `num_steps` optimizer steps.

  Example:
    >>> schedule(1000, dict(prune_start=0.15, prune_end=0.5, prune_interval=10, ema_beta=0.9,
    ...                     eta=0.1))
    Schedule(start=150, end=500, interval=10, ema_beta=0.9, eta=0.1)
  """
  start_frac = float(_field(dyn_cfg, "prune_start"))
  end_frac = float(_field(dyn_cfg, "prune_end"))
  interval = _field(dyn_cfg, "prune_interval")
  beta = float(_field(dyn_cfg, "ema_beta"))
  eta = float(_field(dyn_cfg, "eta"))
  if not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
    raise ConfigError(f"num_steps must be a positive integer, got {num_steps!r}.")
  if not 0.0 <= start_frac <= end_frac <= 1.0:
    raise ConfigError(f"dyndora needs 0 <= prune_start <= prune_end <= 1 (fractions of num_steps), "
                      f"got prune_start={start_frac!r}, prune_end={end_frac!r}.")
  if isinstance(interval, bool) or not isinstance(interval, (int, np.integer)) or interval < 1:
    raise ConfigError(f"dyndora.prune_interval must be a positive integer, got {interval!r}.")
  if not 0.0 <= beta < 1.0:
    raise ConfigError(f"dyndora.ema_beta must be in [0, 1), got {beta!r}.")
  if eta < 0:
    raise ConfigError(f"dyndora.eta must be >= 0, got {eta!r}.")
  # The 1e-9 keeps 0.15 * 40 = 6.000000000000001 and 0.5 * 40 on the intended integer step.
  end = max(1, math.floor(end_frac * num_steps + 1e-9))  # very short runs still prune once
  start = min(math.floor(start_frac * num_steps + 1e-9), end)
  return Schedule(start=start, end=end, interval=int(interval), ema_beta=beta, eta=eta)


def _field(cfg, name):
  try:
    return cfg[name] if isinstance(cfg, Mapping) else getattr(cfg, name)
  except (KeyError, AttributeError) as e:
    raise ConfigError(f"the dyndora config has no {name!r}; it needs prune_start, prune_end, "
                      "prune_interval, ema_beta and eta (see config_lib.base_config).") from e


def scheduled_fraction(step, num_steps: int, dyn_cfg, final_fraction) -> jax.Array:
  """The fraction of all components the schedule switches off at (a prune at) step t.

  0 before the window, final_fraction·(p/P)³ inside it, final_fraction after it. `step` may be a
  traced integer.

  Example:
    >>> cfg = dict(prune_start=0.0, prune_end=0.5, prune_interval=10, ema_beta=0.9, eta=0.1)
    >>> float(scheduled_fraction(25, 100, cfg, 1 / 3))   # p/P = 1/2: (1/3)·(1/8)
    0.041666...
  """
  sched = schedule(num_steps, dyn_cfg)
  p = jnp.asarray(step, jnp.float32) - sched.start
  if sched.span == 0:
    progress = (p >= 0).astype(jnp.float32)
  else:
    progress = jnp.clip(p / sched.span, 0.0, 1.0)
  return jnp.asarray(final_fraction, jnp.float32) * progress ** 3


def is_prune_step(step, num_steps: int, dyn_cfg) -> jax.Array:
  """True at the steps t where post_update prunes (traced-friendly)."""
  sched = schedule(num_steps, dyn_cfg)
  p = jnp.asarray(step, jnp.int32) - sched.start
  return (p >= 0) & (p <= sched.span) & ((p % sched.interval == 0) | (p == sched.span))


# ----------------------------------------------------------------------------------- state

def gates(adapters: Mapping[str, Any]) -> dict[str, jax.Array]:
  """{module_path: gate (r0,)} of every dyndora target, sorted by path.

  Raises:
    ValueError: the adapters hold no dyndora gates (another method's adapters).
  """
  flat = flatten(adapters.get("targets", {}) if isinstance(adapters, Mapping) else {})
  found = {}
  for path, leaf in flat.items():
    if path == GATE or path.endswith(SEP + GATE):
      found[path[:-len(GATE)].rstrip(SEP)] = leaf
  if not found:
    raise CheckpointError(
        "these adapters have no dyndora 'gate' leaves (adapters['targets'][...]['gate']); "
        "dynamic rank allocation needs adapters made with method='dyndora'.")
  return dict(sorted(found.items()))


def component_factors(adapters) -> dict[str, tuple[jax.Array, jax.Array, jax.Array]]:
  flat = flatten(adapters["targets"])
  out = {}
  for module, c_R in gates(adapters).items():
    prefix = module + SEP if module else ""
    a_IxR, b_RxO = flat[prefix + "lora_a"], flat[prefix + "lora_b"]
    if a_IxR.shape[1:] != c_R.shape or b_RxO.shape[:1] != c_R.shape:
      raise CheckpointError(
          f"dyndora target {module!r}: lora_a {a_IxR.shape}, gate {c_R.shape} and "
          f"lora_b {b_RxO.shape} disagree on the stored rank r0.")
    out[module] = (a_IxR, b_RxO, c_R)
  return out


def init_state(adapters: Mapping[str, Any], cfg) -> dict:
  """The initial `TrainState.extra` of a dyndora run: zero importance, everything live.

  Example:
    >>> extra = init_state(adapters, AdapterConfig(method="dyndora", rank=8))
    >>> sorted(extra)
    ['budget', 'importance', 'mask']

  Args:
    adapters: the adapter tree from init_adapters (method 'dyndora').
    cfg: its AdapterConfig; cfg.rank is the average number of live components kept per target.
  """
  if getattr(cfg, "method", None) != "dyndora":
    raise ValueError(f"dynamic rank allocation is DynDoRA's; got method {getattr(cfg, 'method', cfg)!r}.")
  factors = component_factors(adapters)
  for module, (_, _, c_R) in factors.items():
    if c_R.shape != (cfg.stored_rank,):
      raise CheckpointError(
          f"gate of {module!r} has shape {c_R.shape} but the config's stored rank is "
          f"{cfg.stored_rank} (rank {cfg.rank}); were the adapters made with this config?")
  return {
      "importance": unflatten({m: jnp.zeros(c.shape, jnp.float32) for m, (_, _, c) in factors.items()}),
      "mask": unflatten({m: jnp.ones(c.shape, jnp.float32) for m, (_, _, c) in factors.items()}),
      "budget": jnp.asarray(cfg.rank * len(factors), jnp.int32),
  }


# ----------------------------------------------------------------------------------- importance

def component_importance(a_IxR: jax.Array, b_RxO: jax.Array, c_R: jax.Array) -> jax.Array:
  """s_i = ‖c_i·a_i·b_iᵀ‖_F / (‖A·diag(c)·B‖_F + 1e-8) for one target, shape (r0,).

  Neither the r0 outer products nor ΔW (in, out) is formed:
    ‖c_i·a_i·b_iᵀ‖_F = |c_i|·‖a_i‖·‖b_i‖                       (a rank-1 matrix)
    ‖A·diag(c)·B‖_F² = trace(Bᵀ·diag(c)·AᵀA·diag(c)·B)
                     = Σ_ij (AᵀA)_ij·c_i·c_j·(BBᵀ)_ij         (cyclic trace, BBᵀ symmetric)
  so the cost is O((in + out)·r0²) instead of O(in·out·r0).

  Example:
    >>> component_importance(jnp.eye(3, 2), jnp.eye(2, 4), jnp.array([3., 4.]))
    Array([0.6, 0.8], dtype=float32)
  """
  a_IxR = a_IxR.astype(jnp.float32)
  b_RxO = b_RxO.astype(jnp.float32)
  c_R = c_R.astype(jnp.float32)
  hi = jax.lax.Precision.HIGHEST  # the Gram trace cancels terms; bf16 passes would be too coarse
  norm_i_R = jnp.abs(c_R) * jnp.linalg.norm(a_IxR, axis=0) * jnp.linalg.norm(b_RxO, axis=1)
  gram_a_RxR = jnp.matmul(a_IxR.T, a_IxR, precision=hi)
  gram_b_RxR = jnp.matmul(b_RxO, b_RxO.T, precision=hi)
  dw_sq = jnp.sum(gram_a_RxR * gram_b_RxR * (c_R[:, None] * c_R[None, :]))
  dw_norm = jnp.sqrt(jnp.maximum(dw_sq, 0.0))  # rounding can leave a tiny negative
  return norm_i_R / (dw_norm + EPS)


def importance(adapters: Mapping[str, Any]) -> dict[str, jax.Array]:
  """{module_path: s (r0,)}: this step's (un-smoothed) importance of every component."""
  return {m: component_importance(a, b, c) for m, (a, b, c) in component_factors(adapters).items()}


# ----------------------------------------------------------------------------------- pruning

def prune_mask(scores: Mapping[str, jax.Array], num_prune) -> dict[str, jax.Array]:
  """Live mask (1 = keep) per module with one global threshold over all components.

  The threshold is the `num_prune`-th smallest score; every component scoring <= it is pruned,
  ties included. num_prune <= 0 keeps everything. `num_prune` may be traced.

  Example:
    >>> prune_mask({"q": jnp.array([.1, .5]), "v": jnp.array([.1, .9])}, 1)
    {'q': Array([0., 1.], dtype=float32), 'v': Array([0., 1.], dtype=float32)}
  """
  modules = sorted(scores)
  all_N = jnp.concatenate([jnp.ravel(scores[m]) for m in modules])
  k = jnp.clip(jnp.asarray(num_prune, jnp.int32), 0, all_N.size)
  threshold = jnp.sort(all_N)[jnp.maximum(k - 1, 0)]
  return {m: jnp.where((k > 0) & (scores[m] <= threshold), 0.0, 1.0).astype(jnp.float32)
          for m in modules}


def num_to_prune(step, num_steps: int, dyn_cfg, num_components: int, budget) -> jax.Array:
  """k = ⌊n·f(t)⌋ with f(t) = ((n − budget)/n)·(p/P)³, the scheduled count at step t.

  n·f is computed as (n − budget)·(p/P)³ so the final prune is exactly n − budget; the 1e-4
  absorbs float32 rounding where the exact value is an integer.
  """
  final = jnp.asarray(num_components - jnp.asarray(budget, jnp.int32), jnp.float32)
  count = scheduled_fraction(step, num_steps, dyn_cfg, 1.0) * final
  return jnp.floor(count + 1e-4).astype(jnp.int32)


def post_update(adapters: Mapping[str, Any], extra: Mapping[str, Any], step, num_steps: int,
                dyn_cfg) -> tuple[dict, dict]:
  """Importance EMA, scheduled pruning and the final mask, after an optimizer update.

  Runs inside jit: `step` (t, the optimizer steps done including this one) may be traced.

  Example:
    >>> adapters, extra = post_update(adapters, extra, state.step + 1, num_steps, config.dyndora)

  Returns:
    (adapters with gates switched off where pruned, the new extra).
  """
  sched = schedule(num_steps, dyn_cfg)
  factors = component_factors(adapters)
  old_ema = flatten(extra["importance"])
  old_mask = flatten(extra["mask"])
  if set(old_ema) != set(factors) or set(old_mask) != set(factors):
    raise ValueError(f"dyndora state is for modules {sorted(old_ema)} but the adapters have "
                     f"{sorted(factors)}; was `extra` made by init_state for these adapters?")
  t = jnp.asarray(step, jnp.int32)
  tracking = t <= sched.end  # the EMA is frozen once the final mask is fixed
  scores = importance(adapters)
  ema = {m: jnp.where(tracking, sched.ema_beta * old_ema[m] + (1.0 - sched.ema_beta) * scores[m],
                      old_ema[m]) for m in factors}

  prune_now = is_prune_step(t, num_steps, dyn_cfg)
  n = sum(int(c.size) for _, _, c in factors.values())
  live = prune_mask(ema, num_to_prune(t, num_steps, dyn_cfg, n, extra["budget"]))
  mask = {m: jnp.where(prune_now, live[m], old_mask[m]) for m in factors}
  # Between prunes the gates are the optimizer's (revival); at a prune and after the window the
  # recorded mask switches components off.
  apply = prune_now | (t > sched.end)
  flat = flatten(adapters["targets"])
  for m, (_, _, c_R) in factors.items():
    key = m + SEP + GATE if m else GATE
    flat[key] = jnp.where(apply, c_R * mask[m].astype(c_R.dtype), c_R)
  new_adapters = {**adapters, "targets": unflatten(flat)}
  new_extra = {**extra, "importance": unflatten(ema), "mask": unflatten(mask)}
  return new_adapters, new_extra


# ----------------------------------------------------------------------------------- regulariser

def regularizer(adapters: Mapping[str, Any], step, num_steps: int, dyn_cfg) -> jax.Array:
  """η·mean over all components of the unbiased variances Var(A[:, i]) and Var(B[i, :]).

  Active while the train step being taken (step + 1) is at most the last prune step; 0 after.
  `step` is the number of optimizer steps already done (traced inside the train step).

  Example:
    >>> loss = task_loss + regularizer(adapters, state.step, num_steps, config.dyndora)
  """
  sched = schedule(num_steps, dyn_cfg)
  total, count = jnp.zeros((), jnp.float32), 0
  for a_IxR, b_RxO, c_R in component_factors(adapters).values():
    total += jnp.sum(jnp.var(a_IxR.astype(jnp.float32), axis=0, ddof=1))
    total += jnp.sum(jnp.var(b_RxO.astype(jnp.float32), axis=1, ddof=1))
    count += 2 * int(c_R.size)
  active = jnp.asarray(step, jnp.int32) + 1 <= sched.end
  return jnp.where(active, sched.eta * total / count, 0.0)


# ----------------------------------------------------------------------------------- reporting

def live_ranks(adapters: Mapping[str, Any]) -> dict[str, int]:
  """{module_path: number of components with gate != 0}.

  Example:
    >>> live_ranks(state.trainable["adapters"])
    {'bert/encoder/layer/0/attention/self/query': 7, ...}
  """
  return {m: int(np.count_nonzero(np.asarray(c))) for m, c in gates(adapters).items()}


def count_live_params(adapters: Mapping[str, Any]) -> int:
  """Scalars stored for the live components only: (in + out + 1) each (a_i, b_i and c_i).

  Example:
    >>> count_live_params(state.trainable["adapters"]) <= count_params(state.trainable["adapters"])
    True
  """
  total = 0
  for a_IxR, b_RxO, c_R in component_factors(adapters).values():
    total += int(np.count_nonzero(np.asarray(c_R))) * (a_IxR.shape[0] + b_RxO.shape[1] + 1)
  return total


# ----------------------------------------------------------------------------------- optax

class PruningState(NamedTuple):
  """opt_state of `pruning`: optimizer steps done, importance EMA, last mask, live budget."""

  count: jax.Array
  importance: Any
  mask: Any
  budget: jax.Array


def pruning(cfg, dyn_cfg, num_steps: int) -> optax.GradientTransformation:
  """Importance EMA, scheduled pruning and the held mask as a transformation after the optimizer.

  It sees the trainable tree {'params', 'adapters'}; its updates land the adapters exactly on
  `post_update`'s result (a pruned gate's update is −gate, so the new gate is exactly 0).

  Example:
    >>> tx = optax.chain(optax.adamw(1e-3), pruning(adapter_cfg, config.dyndora, 1000))
  """

  def init_fn(params):
    state = init_state(params["adapters"], cfg)
    return PruningState(jnp.zeros((), jnp.int32), state["importance"], state["mask"],
                        state["budget"])

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("dyndora pruning needs the params: tx.update(grads, opt_state, params).")
    t = state.count + 1
    stepped = optax.apply_updates(params["adapters"], updates["adapters"])
    pruned, extra = post_update(stepped, {"importance": state.importance, "mask": state.mask,
                                          "budget": state.budget}, t, num_steps, dyn_cfg)
    adapter_updates = jax.tree_util.tree_map(
        lambda new, old, p, u: jnp.where(new == old, u, -p).astype(u.dtype),
        pruned, stepped, params["adapters"], updates["adapters"])
    new_state = PruningState(t, extra["importance"], extra["mask"], state.budget)
    return {**updates, "adapters": adapter_updates}, new_state

  return optax.GradientTransformation(init_fn, update_fn)


def pruning_state(opt_state) -> dict:
  """{'importance', 'mask', 'budget', 'count'} of the `pruning` transformation inside opt_state.

  Example:
    >>> pruning_state(state.opt_state)["mask"]
  """
  found = [s for s in jax.tree_util.tree_leaves(
      opt_state, is_leaf=lambda x: isinstance(x, PruningState)) if isinstance(s, PruningState)]
  if len(found) != 1:
    raise ValueError(f"expected one dyndora PruningState in the optimizer state, found {len(found)}; "
                     "was the optimizer built with the method's training transform?")
  return found[0]._asdict()
