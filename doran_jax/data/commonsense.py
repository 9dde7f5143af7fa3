"""Source 'commonsense': the DoRA paper's commonsense-reasoning suite (the LLM-Adapters format),
one use of the instruction format.

Records are `{"instruction", "input", "output": "the correct answer is X", "answer": "X"}`, read
from `{path}/{task}/{split}.json` (or one JSON file, or data.train_file for training). Training
text is the Alpaca prompt (`instruction.generate_prompt`) followed by `output`, tokenized by
`instruction.tokenize`: the loss covers only the response tokens (and EOS). The scoring of
generations lives in doran_jax.commonsense.

Example:
  >>> records = load_records("../shared/data/commonsense/boolq/test.json", task="boolq")
  >>> arrays = tokenize_examples(records, tokenizer, max_length=256)
"""

from __future__ import annotations

import collections
import json
import os
from typing import Optional, Sequence

import numpy as np

from doran_jax.data import causal, instruction
from doran_jax.data.base import Source, checked_max_length, is_int, keep
from doran_jax.data.dataset import Dataset
from doran_jax.errors import DataError

_CHOICES = r"answer1|answer2|answer3|answer4|answer5"
ANSWER_PATTERNS = {
    "boolq": r"true|false",
    "piqa": r"solution1|solution2",
    "social_i_qa": _CHOICES,
    "ARC-Challenge": _CHOICES,
    "ARC-Easy": _CHOICES,
    "openbookqa": _CHOICES,
    "hellaswag": r"ending1|ending2|ending3|ending4",
    "winogrande": r"option1|option2",
}
TASKS = tuple(ANSWER_PATTERNS)
# The tasks kept in ../shared/data/commonsense (hellaswag is too large to keep there), and those
# of them that ship a train.json.
LOCAL_TASKS = ("boolq", "piqa", "social_i_qa", "winogrande", "ARC-Challenge", "ARC-Easy",
               "openbookqa")
LOCAL_TRAIN_TASKS = ("boolq", "ARC-Challenge", "ARC-Easy", "openbookqa")
_FIELDS = ("instruction", "output", "answer")


def _check_task(task: str) -> str:
  if task not in ANSWER_PATTERNS:
    raise DataError(f"unknown commonsense task {task!r}; choose one of {', '.join(TASKS)}.")
  return task


def load_records(path: str, task: Optional[str] = None) -> list[dict]:
  """Reads one JSON list of records; each gets a 'task' key (`task`, or its own if present).

  Example:
    >>> records = load_records("../shared/data/commonsense/piqa/test.json", task="piqa")
  """
  path = os.path.expanduser(path)
  if not os.path.isfile(path):
    raise DataError(f"commonsense file {path!r} does not exist; check data.path / data.tasks "
                     "(files are {path}/{task}/{split}.json) or data.train_file.")
  with open(path, encoding="utf-8") as f:
    data = json.load(f)
  if not isinstance(data, list) or not data:
    raise DataError(f"{path} must hold a non-empty JSON list of records.")
  records = []
  for i, rec in enumerate(data):
    if not isinstance(rec, dict) or any(not isinstance(rec.get(k), str) for k in _FIELDS):
      raise DataError(f"{path}: record {i} must be an object with string fields "
                       f"{', '.join(_FIELDS)} (and optionally 'input'); got {str(rec)[:120]!r}.")
    rec = dict(rec, input=rec.get("input") or "")
    rec["task"] = task if task is not None else rec.get("task")
    records.append(rec)
  return records


def read_split(data_cfg, split: str, split_name: str) -> list[dict]:
  """The records of data_cfg's 'train' or 'eval' split (names the split file `split_name`).

  Training reads `train_file` if set, else `path` if it is a JSON file, else the union of
  {path}/{task}/{split_name}.json over `train_tasks` (None: `tasks`). Evaluation reads `path` if
  it is a JSON file (then `tasks` must name its one task), else the union over `tasks`. A set
  `task` replaces both task lists.

  Example:
    >>> cfg = data.default_data_config("commonsense", path="../shared/data/commonsense")
    >>> records = read_split(cfg, "eval", "test")
  """
  path = data_cfg.get("path", None)
  single = data_cfg.get("task", None)
  tasks = (single,) if single else tuple(data_cfg.get("tasks", ()) or ())
  if split == "train":
    train_tasks = data_cfg.get("train_tasks", None)
    tasks = (single,) if single else tuple(train_tasks or tasks)
    train_file = data_cfg.get("train_file", None)
    if train_file:
      return load_records(train_file)
  if not path:
    raise DataError("data source 'commonsense' needs data.path: the folder holding "
                     "{task}/{split}.json (e.g. ../shared/data/commonsense) or one JSON file.")
  path = os.path.expanduser(path)
  if os.path.isfile(path):
    if split == "train":
      return load_records(path)
    if len(tasks) != 1:
      raise DataError(f"data.path {path!r} is one file: set data.task to its task (one of "
                       f"{', '.join(TASKS)}) so answers can be extracted; got tasks={tasks}.")
    return load_records(path, _check_task(tasks[0]))
  if not os.path.isdir(path):
    raise DataError(f"commonsense data.path {path!r} does not exist.")
  if not tasks:
    raise DataError("data.tasks is empty; name the task folders, e.g. ('boolq', 'piqa').")
  records = []
  for task in tasks:
    file = os.path.join(path, _check_task(task), f"{split_name}.json")
    if not os.path.isfile(file):
      raise DataError(f"{file} does not exist: task {task!r} has no {split_name!r} split here. "
                       "Drop it from data.tasks / data.train_tasks or set data.train_file "
                       "(e.g. the combined commonsense_170k.json).")
    records += load_records(file, task)
  return records


def first_per_task(records: Sequence[dict], n: Optional[int]) -> list[dict]:
  """The first n records of each task, in file order (all of them when n is None).

  Example:
    >>> first_per_task(read_split(cfg, "eval", "test"), 20)     # 20 of each task's test.json
  """
  if n is None:
    return list(records)
  seen = collections.Counter()
  out = []
  for r in records:
    seen[r.get("task")] += 1
    if seen[r.get("task")] <= n:
      out.append(r)
  return out


def _prompts(records) -> list[dict]:
  return [{"prompt": instruction.generate_prompt(r["instruction"], r.get("input", "")),
           "completion": r["output"]} for r in records]


def tokenize_examples(records: Sequence[dict], tokenizer, max_length: int
                      ) -> dict[str, np.ndarray]:
  """int32 input_ids, attention_mask, loss_mask (max_length, right padded) for causal LM.

  Like LLM-Adapters' train_on_inputs=False: the Alpaca prompt + output go through
  `instruction.tokenize` (BOS + text + EOS, loss on the output and EOS) and are cut at
  max_length, so an example with no room left loses its EOS (and then its answer).

  Example:
    >>> a = tokenize_examples(records, tokenizer, 256)
    >>> tokenizer.decode(a["input_ids"][0][a["loss_mask"][0] == 1])   # 'the correct answer is true'
  """
  if not records:
    raise DataError("no commonsense records to tokenize.")
  ids, masks = instruction.tokenize(_prompts(records), tokenizer)
  ids, masks, _, _ = causal.fit(ids, masks, max_length)
  return causal.pad(ids, masks, max_length, pad_id=causal.pad_token_id(tokenizer))


def _load(data_cfg, split, name, ctx) -> Dataset:
  checked_max_length(data_cfg)
  records = read_split(data_cfg, split, name)
  if split == "eval":
    # A fixed, comparable eval set: the same first rows of every task's file, whatever the seed.
    records = first_per_task(records, data_cfg.get("eval_per_task", None))
  records = [records[i] for i in keep(data_cfg, split, len(records))]
  ids, masks = instruction.tokenize(_prompts(records), ctx.tokenizer)
  where = data_cfg.get("train_file", None) if split == "train" else None
  return causal.causal_dataset(ids, masks, data_cfg, split, records=records,
                               where=where or f"commonsense {data_cfg.get('path', None)}[{name}]",
                               pad_id=causal.pad_token_id(ctx.tokenizer))


def _problems(data_cfg) -> list[str]:
  problems = []
  names = [data_cfg.get("task", None)] if data_cfg.get("task", None) else (
      list(data_cfg.get("tasks", ()) or ()) + list(data_cfg.get("train_tasks", None) or ()))
  unknown = sorted({str(n) for n in names if n not in TASKS})
  if unknown:
    problems.append(f"unknown commonsense task(s) {unknown} in data.task/tasks/train_tasks; "
                    f"choose among {', '.join(TASKS)}.")
  train_file = data_cfg.get("train_file", None)
  if train_file and not os.path.isfile(os.path.expanduser(train_file)):
    problems.append(f"data.train_file={train_file!r} does not exist.")
  per_task = data_cfg.get("eval_per_task", None)
  if per_task is not None and (not is_int(per_task) or per_task <= 0):
    problems.append(f"data.eval_per_task={per_task!r} must be a positive number of records per "
                    "task or None (all).")
  return problems


SOURCE = Source(name="commonsense", tasks=("causal_lm",), splits=("train", "test"), load=_load,
                problems=_problems, needs_path=True,
                keys={"tasks": (), "train_tasks": None, "task": None, "train_file": None,
                      "eval_per_task": None},
                overrides={"max_length": 256, "tasks": LOCAL_TASKS,
                           "train_tasks": LOCAL_TRAIN_TASKS})
