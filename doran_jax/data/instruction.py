"""Source 'instruction': prompt/completion or Alpaca records, with the loss on the completion.

`{data.path}/{split}.jsonl` (one object a line) or `{split}.json` (a list), split names 'train'
and 'dev' by default. A record is `{"prompt", "completion"}` (the prompt used as it is) or
Alpaca's `{"instruction", "input", "output"}` (the prompt in the Alpaca template,
`generate_prompt`). Tokens: BOS (if the tokenizer has one) + prompt + completion + EOS (if any);
the loss covers the completion and EOS. The commonsense suite is one use of this format.

Example:
  >>> cfg = default_data_config("instruction", path="my_sft", max_length=512)
  >>> train = load_dataset(cfg, "train", tokenizer=tok)
"""

from __future__ import annotations

from doran_jax.data import causal
from doran_jax.data.base import Source, checked_max_length, keep
from doran_jax.data.dataset import Dataset
from doran_jax.errors import DataError

PROMPT = ("Below is an instruction that describes a task. Write a response that appropriately "
          "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
    "{instruction}\n\n### Input:\n{input}\n\n### Response:\n")


def generate_prompt(instruction: str, input: str = "") -> str:  # pylint: disable=redefined-builtin
  """The Alpaca (LLM-Adapters/DoRA) prompt up to and including '### Response:\\n'.

  Example:
    >>> generate_prompt("Please answer true or false: is water wet?")
  """
  if input:
    return PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
  return PROMPT.format(instruction=instruction)


def _is_str(record, key) -> bool:
  return isinstance(record.get(key), str)


def prompt_and_completion(record, where: str = "record") -> tuple[str, str]:
  """(prompt, completion) of a prompt/completion or Alpaca record; DataError naming `where`.

  Example:
    >>> prompt_and_completion({"instruction": "Add 2 and 2.", "output": "4"})[1]
    '4'
  """
  if not isinstance(record, dict):
    raise DataError(f"{where}: a record must be a JSON object, got {type(record).__name__}.")
  if "prompt" in record or "completion" in record:
    if not (_is_str(record, "prompt") and _is_str(record, "completion")):
      raise DataError(f"{where}: a prompt/completion record needs string fields 'prompt' and "
                      f"'completion'; got {str(record)[:120]!r}.")
    return record["prompt"], record["completion"]
  if _is_str(record, "instruction") and _is_str(record, "output") and (
      record.get("input") is None or _is_str(record, "input")):
    return generate_prompt(record["instruction"], record.get("input") or ""), record["output"]
  raise DataError(f"{where}: a record needs string fields 'prompt' and 'completion', or Alpaca's "
                  f"'instruction' and 'output' (and optionally 'input'); got keys "
                  f"{sorted(record)}.")


def read_file(file: str) -> list[dict]:
  """The records of one file as {'prompt', 'completion'} dicts (prompts already templated).

  Example:
    >>> read_file("my_sft/dev.jsonl")[0]["completion"]
  """
  out = []
  for line, record in causal.read_records(file):
    prompt, completion = prompt_and_completion(record, f"{file}:{line}")
    out.append({"prompt": prompt, "completion": completion})
  if not out:
    raise DataError(f"{file} holds no records.")
  return out


def tokenize(records, tokenizer) -> tuple[list[list[int]], list[list[int]]]:
  """Token lists and loss masks (1 on the completion and EOS) of {'prompt', 'completion'} records.

  Example:
    >>> ids, masks = tokenize([{"prompt": "2+2=", "completion": "4"}], tok)
  """
  return causal.prompt_completion_ids(tokenizer, [r["prompt"] for r in records],
                                      [r["completion"] for r in records])


def _load(data_cfg, split, name, ctx) -> Dataset:
  checked_max_length(data_cfg)
  file = causal.split_file(data_cfg, name, "instruction")
  records = read_file(file)
  records = [records[i] for i in keep(data_cfg, split, len(records))]
  ids, masks = tokenize(records, ctx.tokenizer)
  return causal.causal_dataset(ids, masks, data_cfg, split, records=records, where=file,
                               pad_id=causal.pad_token_id(ctx.tokenizer))


SOURCE = Source(name="instruction", tasks=("causal_lm",), splits=("train", "dev"), load=_load,
                problems=lambda data_cfg: causal.file_problems(data_cfg, SOURCE),
                needs_path=True, overrides={"max_length": 512})
