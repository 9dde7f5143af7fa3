"""Per-task losses and metrics (sequence/image classification, causal LM)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax


def _ce_stats(logits_NxV, labels_N):
  """(log-sum-exp, label logit, whether argmax == label) per row, float32.

  argmax's first-index rule without a (value, index) reduce: the label is the argmax when the
  lowest index holding the row max is the label's. XLA:CPU runs jnp.argmax as a variadic
  reduce, several times slower than the max and min reductions it is replaced by here.
  """
  x = logits_NxV.astype(jnp.float32)
  v = x.shape[-1]
  row_max = jnp.max(x, axis=-1, keepdims=True)
  m = jax.lax.stop_gradient(jnp.where(jnp.isfinite(row_max), row_max, 0.0))  # logsumexp's guard
  lse = m[..., 0] + jnp.log(jnp.sum(jnp.exp(x - m), axis=-1))
  label = jnp.take_along_axis(x, labels_N[..., None], axis=-1)[..., 0]
  iota = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
  first_max = jnp.min(jnp.where(x == row_max, iota, v), axis=-1)
  return lse, label, (first_max == labels_N).astype(jnp.float32)


@jax.custom_vjp
def softmax_cross_entropy(logits_NxV, labels_N):
  """-log softmax(logits)[label] and argmax == label (1.0 / 0.0) per row, in float32.

  optax.softmax_cross_entropy_with_integer_labels and jnp.argmax in one custom VJP: the backward
  is one pass, (softmax − onehot)·dce, from the logits and the saved log-sum-exp, instead of
  autodiff's softmax, scatter of the label gradient into zeros and sum (each a full (N, V) float32
  pass; over a 32k-49k vocabulary these passes cost a CPU LLM step more than its LM head's
  backward matmul). The accuracy output has no gradient.

  Args:
    logits_NxV: logits, any float dtype (statistics in float32); leading axes N may be several.
    labels_N: int labels in [0, V).

  Example:
    >>> ce_BxT, correct_BxT = softmax_cross_entropy(logits_BxTxV, targets_BxT)
  """
  return _ce_fwd(logits_NxV, labels_N)[0]


def _ce_fwd(logits, labels):
  lse, label, correct = _ce_stats(logits, labels)
  return (lse - label, correct), (logits, labels, lse)


def _ce_bwd(res, cotangents):
  logits, labels, lse = res
  dce = cotangents[0]
  x = logits.astype(jnp.float32)
  iota = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
  onehot = (iota == labels[..., None]).astype(jnp.float32)
  dx = (jnp.exp(x - lse[..., None]) - onehot) * dce[..., None]
  return dx.astype(logits.dtype), None


softmax_cross_entropy.defvjp(_ce_fwd, _ce_bwd)


def loss_and_metrics(task: str, logits, batch: dict):
  """Mean loss over real examples (batch['weights'] masks padding) and summed metrics."""
  if task == "causal_lm":
    # Position t predicts token t+1; only answer tokens (loss_mask) count. The last position
    # predicts nothing: it gets target 0 and mask 0 rather than slicing the (B, T, V) logits
    # (a copy forward and a zero-padded copy of their gradient backward).
    ids_BxT = batch["input_ids"]
    targets_BxT = jnp.concatenate([ids_BxT[:, 1:], jnp.zeros_like(ids_BxT[:, :1])], axis=1)
    mask_BxT = batch["loss_mask"].astype(jnp.float32)
    mask_BxT = jnp.concatenate([mask_BxT[:, 1:], jnp.zeros_like(mask_BxT[:, :1])], axis=1)
    positions_BxK = batch.get("logit_positions")
    if positions_BxK is not None:
      # The model computed the logits at these positions only (data.causal.target_positions).
      targets_BxT = jnp.take_along_axis(targets_BxT, positions_BxK, axis=1)
      mask_BxT = jnp.take_along_axis(mask_BxT, positions_BxK, axis=1)
    if logits.shape[:2] != targets_BxT.shape:
      raise ValueError(f"causal-LM logits {logits.shape} do not match the targets "
                       f"{targets_BxT.shape}: a model that takes batch['logit_positions'] must "
                       "return logits at those positions only.")
    ce, correct = softmax_cross_entropy(logits, targets_BxT)
    n = jnp.maximum(mask_BxT.sum(), 1.0)
    return (ce * mask_BxT).sum() / n, {"tokens": mask_BxT.sum(),
                                       "token_correct": (correct * mask_BxT).sum()}
  logits_BxC = logits.astype(jnp.float32)
  labels_B = batch["labels"]
  w_B = batch.get("weights", jnp.ones(labels_B.shape, jnp.float32)).astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits_BxC, labels_B)
  n = jnp.maximum(w_B.sum(), 1.0)
  correct = (jnp.argmax(logits_BxC, -1) == labels_B) * w_B
  return (ce * w_B).sum() / n, {"examples": w_B.sum(), "correct": correct.sum()}


def classification_report(predictions: np.ndarray, labels: np.ndarray, num_classes: int) -> dict:
  """Accuracy, macro-F1 and Matthews correlation (multi-class form) from predictions."""
  predictions = np.asarray(predictions)
  labels = np.asarray(labels)
  confusion = np.zeros((num_classes, num_classes), np.float64)
  np.add.at(confusion, (labels, predictions), 1)
  tp = np.diag(confusion)
  precision = tp / np.maximum(confusion.sum(0), 1)
  recall = tp / np.maximum(confusion.sum(1), 1)
  f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0)
  present = confusion.sum(1) > 0
  total = confusion.sum()
  c, t, p = tp.sum(), confusion.sum(1), confusion.sum(0)
  denom = np.sqrt((total**2 - (p * p).sum()) * (total**2 - (t * t).sum()))
  mcc = float((c * total - (t * p).sum()) / denom) if denom > 0 else 0.0
  return {"accuracy": float(c / max(total, 1)), "macro_f1": float(f1[present].mean()),
          "mcc": mcc, "n": int(total)}
