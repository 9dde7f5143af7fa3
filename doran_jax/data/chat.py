"""Source 'chat': conversations rendered with the tokenizer's chat template, loss on the
assistant turns only.

`{data.path}/{split}.jsonl` (one object a line) or `{split}.json` (a list), split names 'train'
and 'dev' by default; a record is `{"messages": [{"role": "system" | "user" | "assistant" |
"tool", "content": "..."}, ...]}` with at least one assistant turn. The targets of assistant
turn i are found by a prefix diff that works with any template: the tokens of messages[:i+1]
beyond the longest common prefix with messages[:i] rendered with the generation prompt (so the
assistant's text and the template's end-of-turn tokens, e.g. '<|im_end|>\\n').

Example:
  >>> cfg = default_data_config("chat", path="my_chats", max_length=512)
  >>> train = load_dataset(cfg, "train", tokenizer=models.load_tokenizer("smollm2"))
"""

from __future__ import annotations

from typing import Sequence

from doran_jax.data import causal
from doran_jax.data.base import Source, checked_max_length, keep
from doran_jax.data.dataset import Dataset
from doran_jax.errors import DataError

ROLES = ("system", "user", "assistant", "tool")


def check_messages(record, where: str = "record") -> list[dict]:
  """The record's messages as {'role', 'content'} dicts; DataError naming `where` otherwise.

  Example:
    >>> check_messages({"messages": [{"role": "user", "content": "Hi"},
    ...                              {"role": "assistant", "content": "Hello!"}]})
  """
  if not isinstance(record, dict) or "messages" not in record:
    got = sorted(record) if isinstance(record, dict) else type(record).__name__
    raise DataError(f"{where}: a chat record must be a JSON object with 'messages' (a list of "
                    f"{{'role', 'content'}}); got {got}.")
  messages = record["messages"]
  if not isinstance(messages, list) or not messages:
    raise DataError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} "
                    "objects.")
  out = []
  for j, m in enumerate(messages):
    if not isinstance(m, dict) or not isinstance(m.get("content"), str):
      raise DataError(f"{where}: message {j} must be an object with a string 'content'; got "
                      f"{str(m)[:80]!r}.")
    if m.get("role") not in ROLES:
      raise DataError(f"{where}: message {j} has role {m.get('role')!r}; roles are "
                      f"{', '.join(ROLES)}.")
    out.append({"role": m["role"], "content": m["content"]})
  if not any(m["role"] == "assistant" for m in out):
    raise DataError(f"{where}: the conversation has no assistant turn, so nothing to train on; "
                    "add one or drop the record.")
  return out


def check_tokenizer(tokenizer) -> None:
  """A tokenizer without a chat template is a DataError saying so.

  Example:
    >>> check_tokenizer(models.load_tokenizer("smollm2"))   # fine: the GGUF carries one
  """
  if not getattr(tokenizer, "chat_template", None):
    raise DataError(
        f"the tokenizer ({type(tokenizer).__name__}) has no chat template (tokenizer.chat_template "
        "is empty), and data.source='chat' renders conversations with it. Use "
        "a chat model's tokenizer (e.g. models.load_tokenizer('smollm2')), set "
        "tokenizer.chat_template, or write the data as data.source='instruction' records.")


def _render_ids(tokenizer, messages, add_generation_prompt: bool, where: str) -> list[int]:
  try:
    text = tokenizer.apply_chat_template(messages, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)
  except Exception as e:  # pylint: disable=broad-except
    # Templates reject conversations with jinja's raise_exception (e.g. roles that must
    # alternate); that is a data problem of this record.
    raise DataError(f"{where}: the chat template refused this conversation: "
                    f"{type(e).__name__}: {e}") from e
  # The template writes every special token itself (BOS included where the model wants one).
  return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def tokenize_conversation(tokenizer, messages: Sequence[dict], where: str = "record"
                          ) -> tuple[list[int], list[int]]:
  """Token ids of the rendered conversation and its loss mask (1 on assistant-turn targets).

  Example:
    >>> ids, mask = tokenize_conversation(tok, [{"role": "user", "content": "Hi"},
    ...                                         {"role": "assistant", "content": "Hello!"}])
    >>> tok.decode([t for t, m in zip(ids, mask) if m])     # 'Hello!<|im_end|>\\n'
  """
  ids = _render_ids(tokenizer, messages, False, where)
  mask = [0] * len(ids)
  for i, m in enumerate(messages):
    if m["role"] != "assistant":
      continue
    prompt = _render_ids(tokenizer, messages[:i], True, where) if i else []
    upto = ids if i + 1 == len(messages) else _render_ids(tokenizer, messages[:i + 1], False, where)
    if upto != ids[:len(upto)]:
      raise DataError(f"{where}: the chat template renders the first {i + 1} messages differently "
                      "once later messages follow, so the assistant tokens cannot be located; "
                      "split the conversation into one record per assistant turn.")
    common = 0
    for a, b in zip(prompt, upto):
      if a != b:
        break
      common += 1
    if common >= len(upto):
      raise DataError(f"{where}: assistant message {i} renders to no tokens after its prompt.")
    mask[common:len(upto)] = [1] * (len(upto) - common)
  return ids, mask


def read_file(file: str) -> list[dict]:
  """The records of one chat file as {'messages': [...]} dicts, each checked.

  Example:
    >>> read_file("my_chats/dev.jsonl")[0]["messages"][-1]["role"]
    'assistant'
  """
  out = [{"messages": check_messages(r, f"{file}:{line}"), "line": line}
         for line, r in causal.read_records(file)]
  if not out:
    raise DataError(f"{file} holds no records.")
  return out


def _load(data_cfg, split, name, ctx) -> Dataset:
  checked_max_length(data_cfg)
  check_tokenizer(ctx.tokenizer)
  file = causal.split_file(data_cfg, name, "chat")
  records = read_file(file)
  records = [records[i] for i in keep(data_cfg, split, len(records))]
  ids, masks = [], []
  for r in records:
    x, m = tokenize_conversation(ctx.tokenizer, r["messages"], f"{file}:{r['line']}")
    ids.append(x)
    masks.append(m)
  return causal.causal_dataset(ids, masks, data_cfg, split, records=records, where=file,
                               pad_id=causal.pad_token_id(ctx.tokenizer))


SOURCE = Source(name="chat", tasks=("causal_lm",), splits=("train", "dev"), load=_load,
                problems=lambda data_cfg: causal.file_problems(data_cfg, SOURCE),
                needs_path=True, overrides={"max_length": 512})
