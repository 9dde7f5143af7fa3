"""The DoRA paper's commonsense-reasoning suite: prompts, causal-LM tokenization, answer scoring.

Records are `{"instruction", "input", "output": "the correct answer is X", "answer": "X"}` (the
LLM-Adapters format). Training text is the Alpaca-style prompt followed by `output`; the loss
covers only the response tokens (and EOS). Evaluation generates greedily from the prompt and
takes the first answer word of the task in the generation, as LLM-Adapters'
commonsense_evaluate.py does. Model-free except `make_generate_fn`.

Example:
  >>> records = load_records("../shared/data/commonsense/boolq/test.json", task="boolq")
  >>> arrays = tokenize_examples(records, tokenizer, max_length=256)
  >>> evaluate_commonsense(make_generate_fn(bb, params, tokenizer), records[:64])
"""

from __future__ import annotations

import collections
import functools
import json
import logging
import math
import os
import re
from typing import Callable, Optional, Sequence

import jax
import numpy as np

PROMPT = ("Below is an instruction that describes a task. Write a response that appropriately "
          "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
    "{instruction}\n\n### Input:\n{input}\n\n### Response:\n")

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


def generate_prompt(instruction: str, input: str = "") -> str:  # pylint: disable=redefined-builtin
  """The LLM-Adapters/DoRA prompt up to and including '### Response:\\n'.

  Example:
    >>> generate_prompt("Please answer true or false: is water wet?")
  """
  if input:
    return PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
  return PROMPT.format(instruction=instruction)


def _check_task(task: str) -> str:
  if task not in ANSWER_PATTERNS:
    raise ValueError(f"unknown commonsense task {task!r}; choose one of {', '.join(TASKS)}.")
  return task


def extract_answer(task: str, text: str) -> str:
  """The first answer word of `task` in a generation, or '' when there is none.

  Case-sensitive, like LLM-Adapters' commonsense_evaluate.py (its answers are lower case).

  Example:
    >>> extract_answer("piqa", "the correct answer is solution2")
    'solution2'
  """
  found = re.findall(ANSWER_PATTERNS[_check_task(task)], text.strip())
  return found[0] if found else ""


# ----------------------------------------------------------------------------------- files


def load_records(path: str, task: Optional[str] = None) -> list[dict]:
  """Reads one JSON list of records; each gets a 'task' key (`task`, or its own if present).

  Example:
    >>> records = load_records("../shared/data/commonsense/piqa/test.json", task="piqa")
  """
  path = os.path.expanduser(path)
  if not os.path.isfile(path):
    raise ValueError(f"commonsense file {path!r} does not exist; check data.path / data.tasks "
                     "(files are {path}/{task}/{split}.json) or data.train_file.")
  with open(path, encoding="utf-8") as f:
    data = json.load(f)
  if not isinstance(data, list) or not data:
    raise ValueError(f"{path} must hold a non-empty JSON list of records.")
  records = []
  for i, rec in enumerate(data):
    if not isinstance(rec, dict) or any(not isinstance(rec.get(k), str) for k in _FIELDS):
      raise ValueError(f"{path}: record {i} must be an object with string fields "
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
    raise ValueError("data source 'commonsense' needs data.path: the folder holding "
                     "{task}/{split}.json (e.g. ../shared/data/commonsense) or one JSON file.")
  path = os.path.expanduser(path)
  if os.path.isfile(path):
    if split == "train":
      return load_records(path)
    if len(tasks) != 1:
      raise ValueError(f"data.path {path!r} is one file: set data.task to its task (one of "
                       f"{', '.join(TASKS)}) so answers can be extracted; got tasks={tasks}.")
    return load_records(path, _check_task(tasks[0]))
  if not os.path.isdir(path):
    raise ValueError(f"commonsense data.path {path!r} does not exist.")
  if not tasks:
    raise ValueError("data.tasks is empty; name the task folders, e.g. ('boolq', 'piqa').")
  records = []
  for task in tasks:
    file = os.path.join(path, _check_task(task), f"{split_name}.json")
    if not os.path.isfile(file):
      raise ValueError(f"{file} does not exist: task {task!r} has no {split_name!r} split here. "
                       "Drop it from data.tasks / data.train_tasks or set data.train_file "
                       "(e.g. the combined commonsense_170k.json).")
    records += load_records(file, task)
  return records


# ---------------------------------------------------------------------------- tokenization


def encode(tokenizer, text: str) -> list[int]:
  """Token ids as the model sees them: BOS (if the tokenizer has one) + the text's tokens.

  No [CLS]/[SEP]-style specials: the same call builds training and generation prompts.

  Example:
    >>> encode(tokenizer, "### Response:")
  """
  ids = tokenizer(text, add_special_tokens=False)["input_ids"]
  bos = tokenizer.bos_token_id
  return ([bos] if bos is not None else []) + list(ids)


def tokenize_examples(records: Sequence[dict], tokenizer, max_length: int
                      ) -> dict[str, np.ndarray]:
  """int32 input_ids, attention_mask, loss_mask (max_length, right padded) for causal LM.

  Like LLM-Adapters' train_on_inputs=False: the full prompt + output is tokenized and cut at
  max_length; EOS is appended when the tokenizer has one and there is room; loss_mask is 1 on
  the tokens after the prompt (the response and EOS). The prompt length is the longest common
  prefix of the prompt's and the full text's tokens, so a token merged across the boundary
  counts as response.

  Example:
    >>> a = tokenize_examples(records, tokenizer, 256)
    >>> tokenizer.decode(a["input_ids"][0][a["loss_mask"][0] == 1])   # 'the correct answer is true'
  """
  if not records:
    raise ValueError("no commonsense records to tokenize.")
  prompts = [generate_prompt(r["instruction"], r.get("input", "")) for r in records]
  fulls = [p + r["output"] for p, r in zip(prompts, records)]
  bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
  eos = tokenizer.eos_token_id
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
  full_ids = tokenizer(fulls, add_special_tokens=False)["input_ids"]
  n = len(records)
  input_ids = np.full((n, max_length), pad, np.int32)
  attention_mask = np.zeros((n, max_length), np.int32)
  loss_mask = np.zeros((n, max_length), np.int32)
  no_answer = 0
  for i, (p, f) in enumerate(zip(prompt_ids, full_ids)):
    common = 0
    for a, b in zip(p, f):
      if a != b:
        break
      common += 1
    ids = (bos + list(f))[:max_length]
    if eos is not None and len(ids) < max_length:
      ids.append(eos)
    start = len(bos) + common
    input_ids[i, :len(ids)] = ids
    attention_mask[i, :len(ids)] = 1
    loss_mask[i, start:len(ids)] = 1
    no_answer += start >= len(ids)
  if no_answer:
    logging.warning("%d of %d commonsense examples lose their whole answer to max_length=%d; "
                    "raise data.max_length.", no_answer, n, max_length)
  return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}


# ------------------------------------------------------------------------------ evaluation


def evaluate_commonsense(generate_fn: Callable[[list[str]], list[str]], examples: Sequence[dict],
                         task: Optional[str] = None, batch_size: int = 8, *,
                         return_outputs: bool = False) -> dict:
  """Accuracy of greedy generations: the extracted answer word must equal record['answer'].

  `generate_fn(prompts) -> generations` (the text after the prompt) comes from the caller, e.g.
  `make_generate_fn`. Batches are padded to batch_size with the last prompt so a jitted
  generate_fn sees one shape. `task` applies to all examples; None uses each record's 'task'.

  Example:
    >>> r = evaluate_commonsense(gen, records, "boolq", batch_size=16)
    >>> r["accuracy"], r["n"], r["per_task"]["boolq"]
  """
  if not examples:
    raise ValueError("evaluate_commonsense needs at least one example.")
  if batch_size <= 0:
    raise ValueError(f"batch_size must be positive, got {batch_size}.")
  tasks = []
  for i, ex in enumerate(examples):
    t = task if task is not None else ex.get("task")
    if t is None:
      raise ValueError(f"example {i} has no 'task'; pass task= (one of {', '.join(TASKS)}).")
    tasks.append(_check_task(t))
  counts = collections.defaultdict(lambda: [0, 0])   # task -> [correct, n]
  outputs = []
  for start in range(0, len(examples), batch_size):
    chunk = examples[start:start + batch_size]
    prompts = [generate_prompt(ex["instruction"], ex.get("input", "")) for ex in chunk]
    prompts += [prompts[-1]] * (batch_size - len(prompts))
    generations = list(generate_fn(prompts))
    if len(generations) < len(chunk):
      raise ValueError(f"generate_fn returned {len(generations)} texts for {len(prompts)} prompts.")
    for j, (ex, text) in enumerate(zip(chunk, generations)):
      t = tasks[start + j]
      pred = extract_answer(t, text)
      counts[t][0] += int(pred == ex["answer"])
      counts[t][1] += 1
      if return_outputs:
        outputs.append({"task": t, "generation": text, "prediction": pred,
                        "answer": ex["answer"]})
  correct = sum(c for c, _ in counts.values())
  result = {"accuracy": correct / len(examples), "n": len(examples),
            "per_task": {t: {"accuracy": c / n, "n": n} for t, (c, n) in sorted(counts.items())}}
  if return_outputs:
    result["outputs"] = outputs
  return result


def make_generate_fn(backbone, params, tokenizer, max_new_tokens: int = 32, *,
                     max_prompt_length: Optional[int] = None, pad_to_multiple_of: int = 64
                     ) -> Callable[[list[str]], list[str]]:
  """Batched greedy decoding with a causal-LM `models.Backbone` (any family), prompts right padded.

  Prompts are encoded like training (`encode`), cut to their last `max_prompt_length` tokens
  (at most the model's positions minus `max_new_tokens`; the end holds the '### Response:'
  cue) and right padded to a multiple of `pad_to_multiple_of`; decoding is
  `models.generate.greedy_generate`, jitted once here, so it compiles once per padded length and
  a row's output does not depend on its batch. Returns only the new text, up to the first EOS
  (the tokenizer's, else the config's), special tokens dropped.

  Example:
    >>> gen = make_generate_fn(bb, params, tokenizer, max_new_tokens=32)
    >>> gen(["Below is an instruction ..."])      # ['the correct answer is true']
  """
  # Lazy: the rest of this module (data loading) must not pull in the model families.
  from doran_jax.models import generate  # pylint: disable=import-outside-toplevel
  if getattr(backbone, "task", None) != "causal_lm" or not hasattr(backbone, "apply"):
    raise ValueError("make_generate_fn needs a causal-LM models.Backbone (models.load_backbone("
                     f"..., 'causal_lm')); got {type(backbone).__name__} with task "
                     f"{getattr(backbone, 'task', None)!r}.")
  if max_new_tokens <= 0 or pad_to_multiple_of <= 0:
    raise ValueError(f"max_new_tokens ({max_new_tokens}) and pad_to_multiple_of "
                     f"({pad_to_multiple_of}) must be positive.")
  config = backbone.config
  # Prompt + answer must fit the model's position table (GPT-2 names its size n_positions).
  positions = config.get("max_position_embeddings") or config.get("n_positions")
  if positions:
    room = positions - max_new_tokens
    if room <= 0:
      raise ValueError(f"max_new_tokens ({max_new_tokens}) leaves no room for a prompt in the "
                       f"model's {positions} positions; lower generate.max_new_tokens.")
    max_prompt_length = min(max_prompt_length or room, room)
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  eos = tokenizer.eos_token_id
  stops = generate.eos_ids(eos if eos is not None else config.get("eos_token_id"))
  # Built once per generate_fn (params are an argument, not a constant), so jit's cache holds one
  # program per (batch, padded length).
  generate_jit = jax.jit(functools.partial(
      generate.greedy_generate, backbone.apply, max_new_tokens=max_new_tokens,
      eos_token_id=stops, pad_token_id=pad))

  def generate_fn(prompts: list[str]) -> list[str]:
    if not prompts:
      raise ValueError("generate_fn needs at least one prompt.")
    encoded = [encode(tokenizer, p) for p in prompts]
    if max_prompt_length:
      encoded = [e[-max_prompt_length:] for e in encoded]
    length = math.ceil(max(len(e) for e in encoded) / pad_to_multiple_of) * pad_to_multiple_of
    length = min(length, max_prompt_length or length)
    input_ids = np.full((len(encoded), length), pad, np.int32)
    attention_mask = np.zeros((len(encoded), length), np.int32)
    for i, e in enumerate(encoded):
      input_ids[i, :len(e)] = e
      attention_mask[i, :len(e)] = 1
    sequences = np.asarray(generate_jit(params, input_ids, attention_mask))
    texts = []
    for row, e in zip(sequences, encoded):
      new = row[len(e):len(e) + max_new_tokens].tolist()
      # Cut at EOS: what follows is padding, which a tokenizer may not count as special.
      stop = next((i for i, tok in enumerate(new) if tok in stops), len(new))
      texts.append(tokenizer.decode(new[:stop], skip_special_tokens=True).strip())
    return texts

  return generate_fn
