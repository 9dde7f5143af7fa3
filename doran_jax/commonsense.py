"""The DoRA paper's commonsense-reasoning suite: prompts, causal-LM tokenization, answer scoring.

Records are `{"instruction", "input", "output": "the correct answer is X", "answer": "X"}` (the
LLM-Adapters format). Training text is the Alpaca-style prompt followed by `output`; the loss
covers only the response tokens (and EOS). Reading and tokenizing the records is the data
package's (doran_jax.data.commonsense, through the instruction source's tokenization); those
names are re-exported here. Evaluation generates greedily from the prompt and
takes the first answer word of the task in the generation, as LLM-Adapters'
commonsense_evaluate.py does. Model-free except `make_generate_fn`.

Example:
  >>> records = load_records("../shared/data/commonsense/boolq/test.json", task="boolq")
  >>> arrays = tokenize_examples(records, tokenizer, max_length=256)
  >>> evaluate_commonsense(make_generate_fn(bb, params, tokenizer), records[:64])
"""

from __future__ import annotations

import collections
import re
from typing import Callable, Optional, Sequence

import numpy as np

# The suite's data part (task names, files, prompts, tokenization) lives in the data package; it is
# re-exported here so `commonsense.X` keeps working.
from doran_jax.data.commonsense import (  # pylint: disable=unused-import
    ANSWER_PATTERNS, LOCAL_TASKS, LOCAL_TRAIN_TASKS, TASKS, _check_task, load_records,
    read_split, tokenize_examples)
from doran_jax.data.instruction import (  # pylint: disable=unused-import
    PROMPT, PROMPT_WITH_INPUT, generate_prompt)
from doran_jax.errors import ConfigError, DataError


def extract_answer(task: str, text: str) -> str:
  """The first answer word of `task` in a generation, or '' when there is none.

  Case-sensitive, like LLM-Adapters' commonsense_evaluate.py (its answers are lower case).

  Example:
    >>> extract_answer("piqa", "the correct answer is solution2")
    'solution2'
  """
  found = re.findall(ANSWER_PATTERNS[_check_task(task)], text.strip())
  return found[0] if found else ""


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
      raise DataError(f"example {i} has no 'task'; pass task= (one of {', '.join(TASKS)}).")
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
  """Batched greedy decoding with a causal-LM `models.Backbone` (any decoder family or GPT-2).

  Prompts are encoded like training (`encode`), cut to their last `max_prompt_length` tokens
  (at most the model's positions minus `max_new_tokens`; the end holds the '### Response:'
  cue) and left padded to a multiple of `pad_to_multiple_of`; decoding is KV-cached
  (`models.generate.generate`), so it compiles once per (batch, padded length) and a row's output
  does not depend on its batch. `backbone.apply` may be any apply function with the Backbone's
  signature (e.g. `evaluate.params_and_apply`'s factored apply with its params). Returns only
  the new text, up to the first EOS (the tokenizer's, else the config's), special tokens dropped.

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
      raise ConfigError(f"max_new_tokens ({max_new_tokens}) leaves no room for a prompt in the "
                        f"model's {positions} positions; lower generate.max_new_tokens.")
    max_prompt_length = min(max_prompt_length or room, room)
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  eos = tokenizer.eos_token_id
  stops = generate.eos_ids(eos if eos is not None else config.get("eos_token_id"))
  # Once per generate_fn: the cache's shape and dtype (an abstract trace when the backbone has
  # no module, e.g. a factored apply).
  spec = generate.cache_spec(backbone, params=params)

  def generate_fn(prompts: list[str]) -> list[str]:
    if not prompts:
      raise ValueError("generate_fn needs at least one prompt.")
    encoded = [encode(tokenizer, p) for p in prompts]
    if max_prompt_length:
      encoded = [e[-max_prompt_length:] for e in encoded]
    new = generate.generate(backbone, params, encoded, max_new_tokens, eos_token_id=stops,
                            pad_token_id=pad, bucket=pad_to_multiple_of, spec=spec)
    texts = []
    for row in np.asarray(new).reshape(len(encoded), -1).tolist():
      # Cut at EOS: what follows is padding, which a tokenizer may not count as special.
      stop = next((i for i, tok in enumerate(row) if tok in stops), len(row))
      texts.append(tokenizer.decode(row[:stop], skip_special_tokens=True).strip())
    return texts

  return generate_fn
