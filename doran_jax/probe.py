"""The linear-probe baseline: logistic regression on frozen mean-pooled features, fitted to convergence.

A head trained at the adapters' learning rate and step count barely moves, which flatters every
adapter. This baseline needs no learning rate: the features are standardised and the L2-regularised
multinomial logistic loss (convex) is minimised full-batch with L-BFGS (optax.lbfgs, line search),
a few hundred iterations.

Example:
  >>> x_NxD, y_N = pooled_features(features_bb.apply, features_bb.params, train_data, 128)
  >>> probe = fit_logistic(x_NxD, y_N, num_classes=2)
  >>> predict_logistic(probe, x_NxD)
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from doran_jax import tasks


def mean_pool(hidden_BxTxD, mask_BxT):
  """Mean of the hidden states over the unpadded tokens."""
  m = mask_BxT.astype(jnp.float32)[..., None]
  return jnp.sum(hidden_BxTxD.astype(jnp.float32) * m, axis=1) / jnp.maximum(m.sum(1), 1.0)


def pooled_features(apply_fn: Callable, params, dataset, batch_size: int):
  """(features (N, D) float32, labels (N,)) of every example of `dataset`, in order, on one host.

  `apply_fn(params, batch, train=False)` returns the last hidden state (B, T, D) (a backbone of
  task 'features').
  """
  pool = jax.jit(lambda p, b: mean_pool(apply_fn(p, b, train=False), b["attention_mask"]))
  xs, ys = [], []
  for batch in dataset.eval_batches(batch_size):
    keep = np.asarray(batch["weights"]) > 0  # the last batch is padded
    xs.append(np.asarray(pool(params, batch))[keep])
    ys.append(np.asarray(batch["labels"])[keep])
  return np.concatenate(xs), np.concatenate(ys)


def fit_logistic(x_NxD, y_N, num_classes: int, *, l2: float = 1e-3, steps: int = 300) -> dict:
  """Multinomial logistic regression on standardised features: argmin CE + (l2/2)·‖W‖².

  Returns {'w' (D, C), 'b' (C,), 'mean' (D,), 'std' (D,)}; the standardisation is fitted on x.
  """
  x = jnp.asarray(x_NxD, jnp.float32)
  y = jnp.asarray(y_N, jnp.int32)
  if x.ndim != 2 or y.shape != (x.shape[0],):
    raise ValueError(f"fit_logistic needs x (N, D) and y (N,), got {x.shape} and {y.shape}.")
  mean, std = x.mean(0), x.std(0) + 1e-6
  z = (x - mean) / std

  def loss(p):
    logits = z @ p["w"] + p["b"]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return ce + 0.5 * l2 * jnp.sum(p["w"] ** 2)

  opt = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(loss)

  def body(_, carry):
    p, state = carry
    value, grad = value_and_grad(p, state=state)
    updates, state = opt.update(grad, state, p, value=value, grad=grad, value_fn=loss)
    return optax.apply_updates(p, updates), state

  p0 = {"w": jnp.zeros((x.shape[1], num_classes), jnp.float32),
        "b": jnp.zeros((num_classes,), jnp.float32)}
  p, _ = jax.jit(lambda p: jax.lax.fori_loop(0, steps, body, (p, opt.init(p))))(p0)
  return {**p, "mean": mean, "std": std}


def predict_logistic(probe: dict, x_NxD) -> np.ndarray:
  z = (jnp.asarray(x_NxD, jnp.float32) - probe["mean"]) / probe["std"]
  return np.asarray(jnp.argmax(z @ probe["w"] + probe["b"], -1))


def linear_probe_baseline(apply_fn: Callable, params, train_data, eval_data, batch_size: int, *,
                          l2: float = 1e-3, steps: int = 300) -> dict:
  """Eval-split metrics (accuracy, macro-F1, MCC) of a logistic regression on frozen features."""
  x_train, y_train = pooled_features(apply_fn, params, train_data, batch_size)
  x_eval, y_eval = pooled_features(apply_fn, params, eval_data, batch_size)
  probe = fit_logistic(x_train, y_train, train_data.num_classes, l2=l2, steps=steps)
  report = tasks.classification_report(predict_logistic(probe, x_eval), y_eval,
                                       eval_data.num_classes)
  train_acc = float(np.mean(predict_logistic(probe, x_train) == y_train))
  return {**report, "train_accuracy": train_acc, "trainable_params": int(probe["w"].size + probe["b"].size)}
