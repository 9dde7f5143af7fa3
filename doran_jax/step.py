"""The train state and the jitted train step: one compiled function from one CPU core to a pod.

Example:
  >>> train_step = make_train_step(backbone, adapter_cfg, tx, training, mesh=mesh, ...)
  >>> state, metrics = train_step(state, frozen, batch)
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from doran_jax import sharding, tasks
from doran_jax.adapters.factored import adapted_apply
from doran_jax.trainable import effective_params, merge_params


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  trainable: Any      # {"params": head (or the whole backbone for 'full'), "adapters": adapter tree}
  opt_state: Any      # the optimizer's state, and any method's training-time state after it
  rng: jax.Array      # raw uint32 key; per-step keys are fold_in(rng, step), so resume is exact


def make_loss_fn(backbone, adapter_cfg, training):
  """(trainable, frozen, batch, key, step) -> (loss, aux) in train mode."""
  task = backbone.task

  def loss_fn(trainable, frozen, batch, key, step):
    key_adapter, key_dropout = jax.random.split(key)
    if adapter_cfg.mode == "factored":
      logits = adapted_apply(backbone.apply, merge_params(frozen, trainable["params"]),
                             trainable["adapters"], adapter_cfg, batch, rng=key_adapter,
                             train=True, dropout_rng=key_dropout)
    else:
      params = effective_params(frozen, trainable, adapter_cfg, rng=key_adapter, train=True)
      logits = backbone.apply(params, batch, train=True, rng=key_dropout)
    loss, aux = tasks.loss_and_metrics(task, logits, batch)
    if training.regularizer is not None:
      reg = training.regularizer(trainable["adapters"], step)
      loss, aux = loss + reg, {**aux, "regularizer": reg}
    return loss, aux

  return loss_fn


def make_train_step(backbone, adapter_cfg, tx, training, *, mesh, state_shardings,
                    frozen_shardings, accum_steps: int = 1):
  """The pure train step: (state, frozen, batch) -> (state, metrics), jitted with shardings.

  Gradients are taken w.r.t. `state.trainable` only; a non-finite loss, gradient or update
  leaves the state unchanged (metrics['finite'] = 0) so the host can stop with the last good
  state. The state is donated.
  """
  grad_fn = jax.value_and_grad(make_loss_fn(backbone, adapter_cfg, training), has_aux=True)
  accum = int(accum_steps)

  def step(state: TrainState, frozen, batch):
    key = jax.random.fold_in(state.rng, state.step)
    if accum == 1:
      (loss, aux), grads = grad_fn(state.trainable, frozen, batch, key, state.step)
    else:
      micro = jax.tree_util.tree_map(lambda x: x.reshape((accum, -1) + x.shape[1:]), batch)
      first = jax.tree_util.tree_map(lambda x: x[0], micro)
      shapes = jax.eval_shape(grad_fn, state.trainable, frozen, first, key, state.step)
      zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

      def body(carry, xs):
        i, mb = xs
        out = grad_fn(state.trainable, frozen, mb, jax.random.fold_in(key, i), state.step)
        return jax.tree_util.tree_map(jnp.add, carry, out), None

      ((loss, aux), grads), _ = jax.lax.scan(body, zeros, (jnp.arange(accum), micro))
      loss = loss / accum
      grads = jax.tree_util.tree_map(lambda g: g / accum, grads)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
    update_norm = optax.tree.norm(updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(update_norm)
    trainable = optax.apply_updates(state.trainable, updates)
    new = state.replace(trainable=trainable, opt_state=opt_state)
    new = jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new, state)
    new = new.replace(step=state.step + 1)
    metrics = {"loss": loss, "grad_norm": grad_norm, "update_norm": update_norm,
               "finite": finite.astype(jnp.float32), **aux}
    return new, metrics

  replicated = sharding.named(mesh, jax.sharding.PartitionSpec())
  batch_sharding = sharding.named(mesh, sharding.batch_spec(mesh))
  return jax.jit(step, in_shardings=(state_shardings, frozen_shardings, batch_sharding),
                 out_shardings=(state_shardings, replicated), donate_argnums=(0,))
