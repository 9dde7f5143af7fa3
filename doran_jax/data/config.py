"""The data section of an experiment config: defaults per source and checks that read no data.

Example:
  >>> c = default_data_config("chat", path="my_chats", packing=True)
  >>> config_problems(c, task="classification")
  ["data.source='chat' feeds model.task causal_lm, but model.task='classification'; ..."]
"""

from __future__ import annotations

import os
from typing import Optional

import ml_collections
from ml_collections import config_dict

from doran_jax.data import registry
from doran_jax.data.base import is_int
from doran_jax.errors import DataError

# Keys every source shares, with their defaults; each source adds its own (Source.keys).
COMMON_KEYS = dict(
    source=None, path=None, format=None, name=None, data_dir=None, text_keys=("sentence",),
    label_key="label", image_key="image", max_length=128, image_size=None, train_split=None,
    eval_split=None, limit=None, eval_limit=None, seed=0, split_seed=0, num_classes=None,
    packing=False, drop_long=False, target_logits_only=True)
# The type of every key whose default is None, so that `--config.data.<key>=...` can set it (a
# plain None field has no type and ml_collections refuses to override it).
TYPES = dict(
    source=str, path=str, format=str, name=str, data_dir=str, image_size=int, train_split=str,
    eval_split=str, limit=int, eval_limit=int, num_classes=int, task=str, train_file=str,
    train_tasks=tuple, eval_per_task=int)


def default_data_config(source: str, **overrides) -> ml_collections.ConfigDict:
  """The data section of an experiment config, with defaults for `source`.

  Every source's config has every key, so switching data.source on the command line works
  (`--config.data.source=chat --config.data.path=DIR`).

  Example:
    >>> c = default_data_config("tsv", path="../shared/data/text/cola", format="cola")
    >>> c = default_data_config("tfds_image", name="oxford_flowers102", image_size=224)
    >>> c = default_data_config("chat", path="my_chats", max_length=1024, packing=True)

  Keys:
    source: one of SOURCES.
    path: folder (tsv: {path}/{split}.tsv; chat, instruction: {path}/{split}.jsonl or .json;
      commonsense: {path}/{task}/{split}.json, or one JSON file; chatterbot: None = the
      package's English folder).
    format: tsv column order, 'sst2' (label<TAB>text) or 'cola' (text<TAB>label).
    name, data_dir: tfds data set name and data_dir (None = ~/tensorflow_datasets).
    text_keys, label_key, image_key: tfds feature names (one or two text keys).
    max_length: tokens per example or packed row (padded and truncated; static shapes for jit).
    image_size: tfds_image output size (None = the `image_size` passed to load_dataset).
    train_split, eval_split: split names; None = the source's default (DEFAULT_SPLITS).
    limit: cap on training examples, a random subset drawn from `seed` (sample efficiency).
    eval_limit: cap on eval examples, a random subset drawn from `split_seed`.
    seed: seeds the `limit` subset.
    split_seed: seeds chatterbot's train/eval split and the eval_limit subset; kept apart from
      `seed` so the eval set stays fixed across training seeds.
    num_classes: tsv: None = inferred from the labels (max + 1).
    packing: causal LM: pack several training examples per row (segment ids, positions that
      restart per example); eval keeps one example a row.
    drop_long: causal LM: drop examples longer than max_length instead of truncating them
      (both are counted in the log).
    target_logits_only: causal LM: compute the LM head only at the positions whose next token
      is a target (the answer of an SFT example), not over every position: the same loss and
      gradients with a fraction of the (tokens x vocabulary) work and memory; False computes
      the logits everywhere.
    min_examples, eval_fraction: chatterbot: keep topics with at least this many utterances;
      the stratified share held out for eval.
    tasks, train_tasks, task, train_file, eval_per_task: commonsense: task folders to evaluate
      on (`tasks`) and to train on (`train_tasks`, None = `tasks`; the defaults are the tasks
      kept in ../shared/data/commonsense, of which only four ship a train.json); `task` (if set)
      replaces both with that one task; `train_file` (if set) trains on this JSON list instead
      (e.g. the 170k combined file) while eval still reads the task folders; `eval_per_task` (if
      set) evaluates on the first this many records of each task's file (before eval_limit).
  """
  chosen = registry.get(source)
  c = dict(COMMON_KEYS, source=source)
  for s in registry.REGISTRY.values():
    c.update(s.keys)
  c.update(chosen.overrides)
  unknown = sorted(set(overrides) - set(c))
  if unknown:
    raise DataError(f"unknown data config key(s) {unknown}; known keys: {', '.join(sorted(c))}.")
  c.update(overrides)
  # A fresh placeholder per key and call: a shared FieldReference would tie configs together.
  return ml_collections.ConfigDict({k: config_dict.placeholder(TYPES[k]) if v is None else v
                                    for k, v in c.items()})


def config_problems(data_cfg, task: Optional[str] = None) -> list[str]:
  """Everything wrong with a data section, checked without reading any data (one line each).

  Local paths must exist; `task` (config.model.task) must be one the source feeds.

  Example:
    >>> config_problems(default_data_config("tsv", path="no/such/folder"))
    ["data.path='no/such/folder' does not exist; ..."]
  """
  problems = []
  name = data_cfg.get("source", None)
  if name not in registry.REGISTRY:
    return [f"data.source={name!r} is not a data source; choose one of "
            f"{', '.join(registry.SOURCES)}."]
  source = registry.get(name)
  if task is not None and task not in source.tasks:
    problems.append(f"data.source={name!r} feeds model.task {' or '.join(source.tasks)}, "
                    f"but model.task={task!r}; change one of them.")
  max_length = data_cfg.get("max_length", None)
  if name != "tfds_image" and (not is_int(max_length) or max_length <= 1):
    problems.append(f"data.max_length={max_length!r} must be an integer > 1 (tokens).")
  for key in ("limit", "eval_limit"):
    value = data_cfg.get(key, None)
    if value is not None and (not is_int(value) or value <= 0):
      problems.append(f"data.{key}={value!r} must be a positive number of examples or None.")
  for key in ("seed", "split_seed"):
    value = data_cfg.get(key, 0)
    if not is_int(value) or value < 0:
      problems.append(f"data.{key}={value!r} must be an integer >= 0.")
  for key in ("packing", "drop_long", "target_logits_only"):
    if data_cfg.get(key, False) not in (True, False):
      problems.append(f"data.{key}={data_cfg.get(key)!r} must be True or False.")
  if data_cfg.get("packing", False) is True:
    if "causal_lm" not in source.tasks:
      problems.append(f"data.packing=True packs causal-LM examples, but data.source={name!r} "
                      f"feeds {' or '.join(source.tasks)}; set data.packing=False.")
    elif task is not None and task != "causal_lm":
      problems.append(f"data.packing=True needs model.task='causal_lm', but model.task="
                      f"{task!r}; set data.packing=False or change model.task.")
  path = data_cfg.get("path", None)
  if path is not None and not isinstance(path, str):
    problems.append(f"data.path={path!r} must be a string (a folder or file).")
    path = None
  if source.needs_path and not path:
    example = {"tsv": "../shared/data/text/sst2", "commonsense": "../shared/data/commonsense"}
    problems.append(f"data source {name!r} needs data.path (e.g. "
                    f"{example.get(name, 'a folder with train.jsonl and dev.jsonl')}).")
  elif path and "://" in path:
    problems.append(f"data.path={path!r} is a URL; data files are read from local disk (only "
                    "model folders and workdirs may be in a bucket). Copy the data to each "
                    "worker (e.g. `gcloud storage cp -r`) and pass the local folder.")
  elif path and not os.path.exists(os.path.expanduser(path)):
    problems.append(f"data.path={path!r} does not exist (relative to {os.getcwd()}); point it "
                    "at the data folder.")
  if source.problems is not None:
    problems += source.problems(data_cfg)
  return problems
