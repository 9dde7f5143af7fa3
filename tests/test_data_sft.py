"""doran_jax.data's causal-LM sources: chat (chat template, loss on assistant turns), instruction
(prompt/completion and Alpaca), over-long examples, file+line errors, config checks."""

import json
import logging

import numpy as np
import pytest

from doran_jax import commonsense, data, errors, models

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + "
          "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|im_start|>assistant\n' }}{% endif %}")
END = "<|im_end|>\n"   # the template's end of turn, part of every assistant target


def _byte_tokenizer(chat_template=CHATML):
  """A byte-level BPE without merges (one token a byte, so decode(encode(s)) == s), ChatML
  specials and a chat template: built offline in the test."""
  from tokenizers import Tokenizer, decoders, pre_tokenizers
  from tokenizers import models as tok_models
  from transformers import PreTrainedTokenizerFast
  vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
  tok = Tokenizer(tok_models.BPE(vocab=vocab, merges=[]))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>",
                                 eos_token="<|im_end|>", pad_token="<|pad|>",
                                 chat_template=chat_template)


@pytest.fixture(scope="module")
def tok():
  return _byte_tokenizer()


def _write_jsonl(path, records):
  path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def _conv(*turns, system=None):
  msgs = [{"role": "system", "content": system}] if system else []
  roles = ("user", "assistant")
  return {"messages": msgs + [{"role": roles[i % 2], "content": t} for i, t in enumerate(turns)]}


CONVS = [
    _conv("What is the capital of France?", "Paris.", system="Be brief."),
    _conv("Hi", "Hello! How can I help?", "Add 2 and 3.", "2 + 3 = 5."),
    _conv("Say é in JSON", "\"\\u00e9\" is é"),
]


def _spans(mask):
  """(start, end) of each run of ones."""
  edges = np.diff(np.concatenate([[0], mask, [0]]))
  return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)))


# ------------------------------------------------------------------------------------ chat


def test_chat_loss_mask_is_exactly_the_assistant_turns(tmp_path, tok):
  _write_jsonl(tmp_path / "train.jsonl", CONVS)
  (tmp_path / "dev.json").write_text(json.dumps(CONVS[:2], indent=2))   # a JSON list works too
  cfg = data.default_data_config("chat", path=str(tmp_path), max_length=160)
  train = data.load_dataset(cfg, "train", tokenizer=tok)
  dev = data.load_dataset(cfg, "eval", tokenizer=tok)
  assert len(train) == 3 and len(dev) == 2 and train.num_classes is None
  assert [r["messages"] for r in train.examples] == [c["messages"] for c in CONVS]
  for ds in (train, dev):
    for i, rec in enumerate(ds.examples):
      ids, att, loss = (ds.arrays[k][i] for k in ("input_ids", "attention_mask", "loss_mask"))
      n = att.sum()
      assert att[:n].all() and not att[n:].any() and not loss[n:].any()
      # The row is the template's rendering of the whole conversation.
      assert tok.decode(ids[:n]) == tok.apply_chat_template(rec["messages"], tokenize=False)
      assistant = [m["content"] for m in rec["messages"] if m["role"] == "assistant"]
      got = [tok.decode(ids[a:b]) for a, b in _spans(loss)]
      assert got == [c + END for c in assistant]
      # Everything else (system, user, the assistant header) is context only.
      assert "user" in tok.decode(ids[:n][loss[:n] == 0])
  assert train.stats["long"] == 0 and train.stats["examples"] == 3


def test_chat_errors_name_the_file_and_line(tmp_path, tok):
  good = json.dumps(CONVS[0])
  cases = {
      "no assistant turn": json.dumps(_conv("only a question")),
      "role 'bot'": json.dumps({"messages": [{"role": "user", "content": "a"},
                                             {"role": "bot", "content": "b"}]}),
      "not valid JSON": '{"messages": [',
      "with 'messages'": json.dumps({"conversation": CONVS[0]["messages"]}),
      "string 'content'": json.dumps({"messages": [{"role": "assistant", "content": 3}]}),
  }
  cfg = data.default_data_config("chat", path=str(tmp_path))
  _write_jsonl(tmp_path / "dev.jsonl", CONVS)
  for match, bad in cases.items():
    (tmp_path / "train.jsonl").write_text(f"{good}\n\n{bad}\n{good}\n")
    with pytest.raises(errors.DataError, match=rf"train\.jsonl:3: .*{match}"):
      data.load_dataset(cfg, "train", tokenizer=tok)
  # In a .json list the error points at the record's line.
  (tmp_path / "train.jsonl").unlink()
  (tmp_path / "train.json").write_text("[\n" + good + ",\n" + cases["no assistant turn"] + "\n]")
  with pytest.raises(errors.DataError, match=r"train\.json:3: .*no assistant turn"):
    data.load_dataset(cfg, "train", tokenizer=tok)
  _write_jsonl(tmp_path / "train.jsonl", CONVS)
  with pytest.raises(errors.DataError, match="both .*train.jsonl.* and .*train.json"):
    data.load_dataset(cfg, "train", tokenizer=tok)
  (tmp_path / "train.json").unlink()
  with pytest.raises(errors.DataError, match="no chat template"):
    data.load_dataset(cfg, "train", tokenizer=_byte_tokenizer(chat_template=None))
  strict = _byte_tokenizer("{{ raise_exception('roles must alternate') }}")
  with pytest.raises(errors.DataError, match=r"train\.jsonl:1: .*roles must alternate"):
    data.load_dataset(cfg, "train", tokenizer=strict)


def test_chat_over_long_examples_are_truncated_or_dropped_and_counted(tmp_path, tok, caplog):
  _write_jsonl(tmp_path / "train.jsonl", CONVS)
  _write_jsonl(tmp_path / "dev.jsonl", CONVS)
  lengths = [len(data.tokenize_conversation(tok, c["messages"])[0]) for c in CONVS]
  limit = sorted(lengths)[1]          # one example fits exactly, one is shorter, one longer
  cfg = data.default_data_config("chat", path=str(tmp_path), max_length=limit)
  with caplog.at_level(logging.WARNING):
    cut = data.load_dataset(cfg, "train", tokenizer=tok)
  assert cut.stats["long"] == 1 and cut.stats["dropped"] == 0 and len(cut) == 3
  assert "1 of 3 examples are longer than data.max_length" in caplog.text
  assert "truncated" in caplog.text
  longest = int(np.argmax(lengths))
  full_ids, full_mask = data.tokenize_conversation(tok, CONVS[longest]["messages"])
  np.testing.assert_array_equal(cut.arrays["input_ids"][longest], full_ids[:limit])
  np.testing.assert_array_equal(cut.arrays["loss_mask"][longest], full_mask[:limit])
  cfg.drop_long = True
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    kept = data.load_dataset(cfg, "train", tokenizer=tok)
  assert len(kept) == 2 and kept.stats["dropped"] == 1 and "dropped" in caplog.text
  assert [r["messages"] for r in kept.examples] == [
      c["messages"] for i, c in enumerate(CONVS) if i != longest]
  cfg.max_length = 8
  with pytest.raises(errors.DataError, match="all 3 examples are longer"):
    data.load_dataset(cfg, "train", tokenizer=tok)


@pytest.mark.slow
def test_chat_on_the_real_smollm2_tokenizer(tmp_path):
  tok = models.load_tokenizer("smollm2")
  _write_jsonl(tmp_path / "train.jsonl", CONVS)
  _write_jsonl(tmp_path / "dev.jsonl", CONVS[:1])
  ds = data.load_dataset(data.default_data_config("chat", path=str(tmp_path)), "train",
                         tokenizer=tok)
  for i, conv in enumerate(CONVS):
    ids, loss = ds.arrays["input_ids"][i], ds.arrays["loss_mask"][i]
    assistant = [m["content"] for m in conv["messages"] if m["role"] == "assistant"]
    assert [tok.decode(ids[a:b]) for a, b in _spans(loss)] == [c + END for c in assistant]
  # The template adds SmolLM's default system prompt where the data has none; it is context.
  assert "You are a helpful AI assistant named SmolLM" in tok.decode(ds.arrays["input_ids"][1])


# ----------------------------------------------------------------------------- instruction


RECORDS = [
    {"prompt": "Translate to French: cat\n", "completion": "chat"},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    {"instruction": "Name a colour.", "output": "blue"},
]


def test_instruction_both_formats_loss_on_the_completion(tmp_path, tok):
  _write_jsonl(tmp_path / "train.jsonl", RECORDS)
  _write_jsonl(tmp_path / "dev.jsonl", RECORDS[:1])
  ds = data.load_dataset(data.default_data_config("instruction", path=str(tmp_path)), "train",
                         tokenizer=tok)
  prompts = [RECORDS[0]["prompt"],
             commonsense.generate_prompt("Add the numbers.", "2 and 3"),
             commonsense.generate_prompt("Name a colour.")]
  completions = ["chat", "5", "blue"]
  assert [r["prompt"] for r in ds.examples] == prompts
  assert "### Input:\n2 and 3" in prompts[1] and "### Input" not in prompts[2]
  for i, (p, c) in enumerate(zip(prompts, completions)):
    ids, att, loss = (ds.arrays[k][i] for k in ("input_ids", "attention_mask", "loss_mask"))
    n = att.sum()
    # BOS + prompt as context; completion + EOS as targets.
    assert tok.decode(ids[:n][loss[:n] == 0]) == tok.bos_token + p
    assert tok.decode(ids[loss == 1]) == c + tok.eos_token
  bad = tmp_path / "bad"
  bad.mkdir()
  _write_jsonl(bad / "dev.jsonl", RECORDS)
  (bad / "train.jsonl").write_text(json.dumps(RECORDS[0]) + "\n" + json.dumps(
      {"instruction": "x", "response": "y"}) + "\n")
  with pytest.raises(errors.DataError, match=r"train\.jsonl:2: .*'prompt' and 'completion'"):
    data.load_dataset(data.default_data_config("instruction", path=str(bad)), "train",
                      tokenizer=tok)


def test_commonsense_is_the_instruction_format(shared_data, tmp_path):
  # Alpaca records of the commonsense suite, read as an instruction data set, give the same rows
  # as the commonsense source (one tokenisation for both).
  import transformers
  tok = transformers.AutoTokenizer.from_pretrained(models.minilm_path(), bos_token="[CLS]",
                                                   eos_token="[SEP]")
  recs = commonsense.load_records(str(shared_data / "commonsense" / "boolq" / "test.json"),
                                  "boolq")[:20]
  _write_jsonl(tmp_path / "dev.jsonl", recs)
  _write_jsonl(tmp_path / "train.jsonl", recs[:1])
  ds = data.load_dataset(data.default_data_config("instruction", path=str(tmp_path),
                                                  max_length=96), "eval", tokenizer=tok)
  ref = commonsense.tokenize_examples(recs, tok, 96)
  for k in ("input_ids", "attention_mask", "loss_mask"):
    np.testing.assert_array_equal(ds.arrays[k], ref[k])
  assert tok.decode(ds.arrays["input_ids"][0][ds.arrays["loss_mask"][0] == 1],
                    skip_special_tokens=True) == recs[0]["output"]


# ---------------------------------------------------------------------------------- config


def test_config_keys_and_problems(tmp_path, shared_data):
  c = data.default_data_config("commonsense", path=str(shared_data / "commonsense"))
  assert c.packing is False and c.drop_long is False
  # A commonsense config becomes a chat one by changing source and path only.
  _write_jsonl(tmp_path / "train.jsonl", CONVS)
  _write_jsonl(tmp_path / "dev.jsonl", CONVS)
  c.source, c.path = "chat", str(tmp_path)
  assert data.config_problems(c, "causal_lm") == []
  assert data.split_name(c, "eval") == "dev"
  assert len(data.load_dataset(c, "eval", tokenizer=_byte_tokenizer())) == 3
  c.packing = True
  assert any("packing=True needs model.task='causal_lm'" in p and "'classification'" in p
             for p in data.config_problems(c, "classification"))
  t = data.default_data_config("tsv", path=str(shared_data / "text" / "sst2"), packing=True)
  assert any("packing=True packs causal-LM examples" in p and "'tsv'" in p
             for p in data.config_problems(t, "classification"))
  loose = dict(c.to_dict(), packing="yes")   # a plain dict is not type-checked
  assert any("data.packing='yes' must be True or False" in p for p in data.config_problems(loose))
  (tmp_path / "dev.jsonl").unlink()
  c.packing = False
  problems = data.config_problems(c, "causal_lm")
  assert len(problems) == 1 and "no dev.jsonl or dev.json" in problems[0]
  assert any("needs data.path" in p
             for p in data.config_problems(data.default_data_config("instruction")))


def test_commonsense_eval_per_task_takes_the_first_records_of_each_task(shared_data, tok):
  root = shared_data / "commonsense"
  cfg = data.default_data_config("commonsense", path=str(root), tasks=("piqa", "winogrande"),
                                 eval_per_task=5, max_length=200)
  ds = data.load_dataset(cfg, "eval", tokenizer=tok)
  expected = [r for t in ("piqa", "winogrande")
              for r in commonsense.load_records(str(root / t / "test.json"), t)[:5]]
  assert ds.examples == expected
  cfg.eval_per_task = 0
  assert any("data.eval_per_task=0 must be a positive" in p for p in data.config_problems(cfg))


def test_the_llm_config_trains_on_chat_data_by_source_and_path_alone(tmp_path, tok):
  from configs import smollm2
  from doran_jax import config_lib
  _write_jsonl(tmp_path / "train.jsonl", CONVS * 4)
  _write_jsonl(tmp_path / "dev.jsonl", CONVS)
  c = smollm2.get_config()
  c.data.source, c.data.path = "chat", str(tmp_path)     # what --config.data.X=... sets
  config_lib.validate(c, with_model=False)
  train = data.load_dataset(c.data, "train", tokenizer=tok)
  dev = data.load_dataset(c.data, "eval", tokenizer=tok)
  assert len(dev) == 3 and dev.examples[0]["messages"] == CONVS[0]["messages"]
  assert train.stats["examples"] == 12
  if c.data.packing:
    assert "segment_ids" in train.arrays and len(train) < 12
