"""Per-task losses and metrics (sequence/image classification, causal LM)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax


def loss_and_metrics(task: str, logits, batch: dict):
  """Mean loss over real examples (batch['weights'] masks padding) and summed metrics."""
  if task == "causal_lm":
    # Position t predicts token t+1; only answer tokens (loss_mask) count.
    logits_BxTxV = logits[:, :-1].astype(jnp.float32)
    targets_BxT = batch["input_ids"][:, 1:]
    mask_BxT = batch["loss_mask"][:, 1:].astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV, targets_BxT)
    n = jnp.maximum(mask_BxT.sum(), 1.0)
    correct = (jnp.argmax(logits_BxTxV, -1) == targets_BxT) * mask_BxT
    return (ce * mask_BxT).sum() / n, {"tokens": mask_BxT.sum(), "token_correct": correct.sum()}
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
