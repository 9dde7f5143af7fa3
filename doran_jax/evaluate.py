"""Evaluation with the merged (train=False) weights: classification metrics and LM loss."""

from __future__ import annotations

import functools
import json
import os

import jax
import numpy as np

from doran_jax import tasks
from doran_jax.trainable import effective_params


_merge = jax.jit(effective_params, static_argnames=("adapter_cfg", "train"))


def merged_params(frozen, trainable, adapter_cfg):
  """W' folded into the backbone once per evaluation (zero inference overhead)."""
  return _merge(frozen, trainable, adapter_cfg, train=False)


@functools.lru_cache(maxsize=8)
def make_forward(model, task: str):
  """Jitted (params, batch) -> logits, one compilation per model and task."""
  @jax.jit
  def forward(params, batch):
    return model(**tasks.model_inputs(task, batch), params=params, train=False).logits
  return forward


def evaluate(model, task: str, frozen, trainable, adapter_cfg, dataset, batch_size: int) -> dict:
  """Accuracy / macro-F1 / MCC / cross-entropy for classification; loss and token accuracy for
  causal LM.

  Example:
    >>> evaluate(run.backbone.model, "classification", run.frozen, state.trainable,
    ...          run.adapter_cfg, run.eval_data, 128)
    {'accuracy': 0.91, 'macro_f1': 0.88, 'mcc': 0.87, 'n': 412, 'eval_loss': 0.27}
  """
  params = merged_params(frozen, trainable, adapter_cfg)
  forward = make_forward(model, task)
  if task == "causal_lm":
    total = n = correct = 0.0
    for batch in dataset.eval_batches(batch_size):
      batch = {**batch, "loss_mask": batch["loss_mask"] * batch["weights"][:, None]}
      loss, aux = tasks.loss_and_metrics(task, forward(params, batch), batch)
      total += float(loss) * float(aux["tokens"])
      n += float(aux["tokens"])
      correct += float(aux["token_correct"])
    return {"eval_loss": total / max(n, 1.0), "token_accuracy": correct / max(n, 1.0)}
  predictions, labels = [], []
  total = n = 0.0
  for batch in dataset.eval_batches(batch_size):
    logits = forward(params, batch)
    loss, aux = tasks.loss_and_metrics(task, logits, batch)   # the training loss, padding masked
    total += float(loss) * float(aux["examples"])
    n += float(aux["examples"])
    keep = np.asarray(batch["weights"]) > 0
    predictions.append(np.asarray(logits).argmax(-1)[keep])
    labels.append(np.asarray(batch["labels"])[keep])
  report = tasks.classification_report(np.concatenate(predictions), np.concatenate(labels),
                                       dataset.num_classes)
  return {**report, "eval_loss": total / max(n, 1.0)}


def majority_baseline(train_data, eval_data) -> dict:
  """Metrics of always predicting the most frequent training class."""
  labels = np.asarray(train_data.arrays["labels"])
  majority = np.bincount(labels, minlength=train_data.num_classes).argmax()
  eval_labels = np.asarray(eval_data.arrays["labels"])
  return tasks.classification_report(np.full_like(eval_labels, majority), eval_labels,
                                     eval_data.num_classes)


def evaluate_run(config, *, workdir=None, adapters_dir=None, step=None, save=True) -> dict:
  """Evaluates a checkpoint (the latest, or `step`) or an adapter-only export on the eval split.

  The metrics get 'step' and 'source' keys and, with `save`, are written as JSON next to what
  was evaluated: <workdir>/eval_step<N>.json, or <adapters_dir>/eval.json.

  Example:
    >>> from configs import sst2
    >>> evaluate_run(sst2.get_config("method=dora"), workdir="runs/sst2")["accuracy"]
  """
  from doran_jax import checkpoint, trainer  # trainer imports this module
  run = trainer.setup(config)
  if adapters_dir:
    if step is not None:
      raise ValueError("step selects a checkpoint in a workdir; an adapter export has no steps.")
    trainable, cfg, extra = checkpoint.load_adapters(adapters_dir)
    if cfg.method != run.adapter_cfg.method:
      raise ValueError(f"export {adapters_dir} holds {cfg.method!r} adapters but the config says "
                       f"{run.adapter_cfg.method!r}; pass the matching config.")
    source, out_path = adapters_dir, os.path.join(adapters_dir, "eval.json")
    step = extra.get("step")
  else:
    workdir = workdir or config.workdir
    mngr = checkpoint.manager(os.path.join(workdir, "checkpoints"))
    abstract = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), run.state)
    state, _ = checkpoint.restore(mngr, abstract, step)
    mngr.close()
    trainable, cfg, step = state.trainable, run.adapter_cfg, int(state.step)
    source, out_path = workdir, os.path.join(workdir, f"eval_step{step}.json")
  metrics = evaluate(run.backbone.model, config.model.task, run.frozen, trainable, cfg,
                     run.eval_data, config.eval_batch_size)
  metrics = {"step": step, "source": source, **metrics}
  if save and jax.process_index() == 0:
    with open(out_path, "w") as f:
      json.dump(metrics, f, indent=2)
  return metrics
