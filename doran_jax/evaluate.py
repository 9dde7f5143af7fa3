"""Evaluation given a predict function and shardings: classification metrics and LM loss.

Eval batches are laid out like training batches (each host reads its rows, sharded along the
mesh's batch axes); sums are taken inside the jitted function over the global batch, and the
predictions that macro-F1 and MCC need are gathered from every host. Never imports the trainer.

Example:
  >>> predict = make_predict_fn(backbone.apply, mesh)
  >>> evaluate(predict, "classification", merged, eval_data, 128, mesh=mesh)
  {'accuracy': 0.91, 'macro_f1': 0.88, 'mcc': 0.87, 'n': 412, 'eval_loss': 0.27}
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from doran_jax import quant, sharding, tasks
from doran_jax.adapters.factored import adapted_apply
from doran_jax.trainable import effective_params, merge_params

_merge = jax.jit(effective_params, static_argnames=("adapter_cfg", "train"))


def merged_params(frozen, trainable, adapter_cfg):
  """W' folded into the backbone once per evaluation (zero inference overhead)."""
  return _merge(frozen, trainable, adapter_cfg, train=False)


def factored_apply(apply_fn: Callable, adapter_cfg) -> Callable:
  """(params={'params': backbone + head, 'adapters': tree}, batch, train=, rng=) -> logits, the
  adapters applied in factored form (`adapted_apply`)."""
  def apply(params, batch, *, train=False, rng=None):
    return adapted_apply(apply_fn, params["params"], params["adapters"], adapter_cfg, batch,
                         rng=rng, train=train, dropout_rng=rng)
  return apply


def params_and_apply(apply_fn: Callable, frozen, trainable, adapter_cfg):
  """(params, apply_fn) to evaluate with: the merged W' (zero inference overhead) or, on a
  quantised base, the factored form (W' would be a full-precision copy of every adapted kernel).

  Example:
    >>> params, apply = params_and_apply(bb.apply, run.frozen, state.trainable, run.adapter_cfg)
    >>> evaluate(make_predict_fn(apply, mesh), "classification", params, data, 128, mesh=mesh)
  """
  if adapter_cfg.has_adapters and quant.any_quantized(frozen):
    params = {"params": merge_params(frozen, trainable["params"]), "adapters": trainable["adapters"]}
    return params, factored_apply(apply_fn, adapter_cfg)
  return merged_params(frozen, trainable, adapter_cfg), apply_fn


def make_predict_fn(apply_fn: Callable, mesh=None) -> Callable:
  """Jitted (params, batch) -> logits in eval mode, the batch sharded along the mesh's batch axes.

  Example:
    >>> predict = make_predict_fn(bb.apply, mesh)
  """
  def predict(params, batch):
    return apply_fn(params, batch, train=False)

  if mesh is None:
    return jax.jit(predict)
  rows = sharding.named(mesh, sharding.batch_spec(mesh))
  return jax.jit(predict, in_shardings=(None, rows), out_shardings=rows)


def _gather(x) -> np.ndarray:
  """A batch-sharded global array as one host array, on every process."""
  if jax.process_count() == 1:
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def evaluate(predict_fn: Callable, task: str, params, dataset, batch_size: int, *, mesh=None) -> dict:
  """Accuracy / macro-F1 / MCC / cross-entropy for classification; loss, perplexity and token
  accuracy (over the loss_mask's target tokens) for causal LM. With `mesh`, each process feeds its rows of every eval batch.

  Example:
    >>> evaluate(make_predict_fn(bb.apply, mesh), "classification", merged, data, 128, mesh=mesh)
  """
  process = dict(process_index=jax.process_index(), process_count=jax.process_count())
  if mesh is None:
    process = dict(process_index=0, process_count=1)

  def batches():
    for local in dataset.eval_batches(batch_size, **process):
      yield local if mesh is None else sharding.global_batch(local, mesh)

  if task == "causal_lm":
    total = n = correct = 0.0
    for batch in batches():
      batch = {**batch, "loss_mask": batch["loss_mask"] * batch["weights"][:, None]}
      loss, aux = tasks.loss_and_metrics(task, predict_fn(params, batch), batch)
      total += float(loss) * float(aux["tokens"])
      n += float(aux["tokens"])
      correct += float(aux["token_correct"])
    loss = total / max(n, 1.0)
    # Perplexity over the held-out target tokens: exp of their mean cross-entropy.
    return {"eval_loss": loss, "perplexity": float(np.exp(min(loss, 700.0))),
            "token_accuracy": correct / max(n, 1.0)}
  predictions, labels, weights = [], [], []
  total = n = 0.0
  for batch in batches():
    logits = predict_fn(params, batch)
    loss, aux = tasks.loss_and_metrics(task, logits, batch)   # the training loss, padding masked
    total += float(loss) * float(aux["examples"])
    n += float(aux["examples"])
    predictions.append(_gather(jnp.argmax(logits, -1)))
    labels.append(_gather(batch["labels"]))
    weights.append(_gather(batch["weights"]))
  keep = np.concatenate(weights) > 0
  report = tasks.classification_report(np.concatenate(predictions)[keep],
                                       np.concatenate(labels)[keep], dataset.num_classes)
  return {**report, "eval_loss": total / max(n, 1.0)}


def majority_baseline(train_data, eval_data) -> dict:
  """Metrics of always predicting the most frequent training class."""
  labels = np.asarray(train_data.arrays["labels"])
  majority = np.bincount(labels, minlength=train_data.num_classes).argmax()
  eval_labels = np.asarray(eval_data.arrays["labels"])
  return tasks.classification_report(np.full_like(eval_labels, majority), eval_labels,
                                     eval_data.num_classes)
