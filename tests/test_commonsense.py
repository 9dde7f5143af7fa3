"""doran_jax.commonsense on the real ../shared/data/commonsense files; tiny LLaMA and GPT-2 models
generate (and match torch transformers' greedy generate)."""

import functools

import jax
import numpy as np
import pytest

from doran_jax import commonsense, data, models


@functools.lru_cache(maxsize=None)
def commonsense_tokenizer():
  import transformers
  return transformers.AutoTokenizer.from_pretrained(models.minilm_path())


@pytest.fixture(scope="module")
def tokenizer():
  return commonsense_tokenizer()


@pytest.fixture(scope="module")
def root(shared_data):
  return shared_data / "commonsense"


def _cfg(root, **kw):
  return data.default_data_config("commonsense", path=str(root), **kw)


def test_training_arrays_mask_only_the_answer(root, tokenizer):
  ds = data.load_dataset(_cfg(root, limit=40, max_length=256), "train", tokenizer=tokenizer)
  assert len(ds) == 40 and ds.num_classes is None and len(ds.examples) == 40
  assert {r["task"] for r in ds.examples} <= set(commonsense.LOCAL_TRAIN_TASKS)
  ids, att, loss = (ds.arrays[k] for k in ("input_ids", "attention_mask", "loss_mask"))
  assert ids.shape == att.shape == loss.shape == (40, 256) and ids.dtype == np.int32
  for i, rec in enumerate(ds.examples):
    n = att[i].sum()
    assert att[i, :n].all() and not att[i, n:].any()            # right padding
    assert not loss[i, n:].any()
    assert tokenizer.decode(ids[i][loss[i] == 1]) == rec["output"]
    prompt = commonsense.generate_prompt(rec["instruction"], rec["input"])
    assert prompt.startswith("Below is an instruction") and prompt.endswith("### Response:\n")
    expected = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert list(ids[i][(loss[i] == 0) & (att[i] == 1)]) == expected


def test_eos_bos_and_truncation(root, tokenizer):
  import transformers
  tok = transformers.AutoTokenizer.from_pretrained(models.minilm_path(), bos_token="[CLS]",
                                                   eos_token="[SEP]")
  recs = commonsense.load_records(str(root / "boolq" / "test.json"), "boolq")[:3]
  a = commonsense.tokenize_examples(recs, tok, 256)
  n = a["attention_mask"][0].sum()
  assert a["input_ids"][0, 0] == tok.bos_token_id and a["loss_mask"][0, 0] == 0
  assert a["input_ids"][0, n - 1] == tok.eos_token_id and a["loss_mask"][0, n - 1] == 1
  assert tok.decode(a["input_ids"][0][a["loss_mask"][0] == 1], skip_special_tokens=True) == (
      recs[0]["output"])
  short = commonsense.tokenize_examples(recs, tok, 16)   # the answer is cut off entirely
  assert short["attention_mask"].all() and not short["loss_mask"].any()
  assert short["input_ids"][0, -1] != tok.eos_token_id   # no room: no EOS, like LLM-Adapters


def test_eval_split_reads_every_task_test_file(root, tokenizer):
  cfg = _cfg(root, tasks=("piqa", "winogrande"), max_length=128, eval_limit=30)
  ds = data.load_dataset(cfg, "eval", tokenizer=tokenizer)
  assert len(ds) == 30 and {r["task"] for r in ds.examples} == {"piqa", "winogrande"}
  full = commonsense.read_split(cfg, "eval", "test")
  assert len(full) == 1838 + 1267


def test_split_errors_and_single_files(root, tmp_path):
  with pytest.raises(ValueError, match="piqa.*train"):
    commonsense.read_split(_cfg(root, train_tasks=None), "train", "train")
  with pytest.raises(ValueError, match="data.path"):
    commonsense.read_split(data.default_data_config("commonsense"), "train", "train")
  one = str(root / "openbookqa" / "test.json")
  with pytest.raises(ValueError, match="data.task"):
    commonsense.read_split(_cfg(one), "eval", "test")
  recs = commonsense.read_split(_cfg(one, task="openbookqa"), "eval", "test")
  assert len(recs) == 500 and recs[0]["task"] == "openbookqa"
  train = commonsense.read_split(_cfg(root, train_file=one), "train", "train")
  assert len(train) == 500
  bad = tmp_path / "bad.json"
  bad.write_text('[{"instruction": "q"}]')
  with pytest.raises(ValueError, match="record 0"):
    commonsense.load_records(str(bad))
  with pytest.raises(ValueError, match="unknown commonsense task 'mmlu'"):
    commonsense.read_split(_cfg(root, task="mmlu"), "eval", "test")


def test_extract_answer_on_real_outputs_and_generations(root):
  for task in commonsense.LOCAL_TASKS:
    recs = commonsense.load_records(str(root / task / "test.json"), task)
    assert all(commonsense.extract_answer(task, r["output"]) == r["answer"] for r in recs)
  ex = commonsense.extract_answer
  assert ex("boolq", " false. it is true that ...") == "false"       # first match wins
  assert ex("piqa", "the correct answer is solution2\n\n### Instruction") == "solution2"
  assert ex("social_i_qa", "answer3 is right, not answer1") == "answer3"
  assert ex("hellaswag", "the correct answer is ending4") == "ending4"
  assert ex("winogrande", "option1") == "option1"
  assert ex("ARC-Easy", "i do not know") == ""
  with pytest.raises(ValueError, match="unknown commonsense task"):
    ex("arc", "answer1")


def test_evaluate_commonsense_with_fake_generators(root):
  recs = (commonsense.load_records(str(root / "boolq" / "test.json"), "boolq")[:5]
          + commonsense.load_records(str(root / "ARC-Easy" / "test.json"), "ARC-Easy")[:6])
  by_prompt = {commonsense.generate_prompt(r["instruction"], r["input"]): r for r in recs}
  calls = []

  def right(prompts):
    calls.append(len(prompts))
    return [by_prompt[p]["output"] for p in prompts]

  def wrong(prompts):
    flip = {"true": "false", "false": "true", "answer1": "answer2"}
    return [f"the correct answer is {flip.get(by_prompt[p]['answer'], 'answer1')}"
            for p in prompts]

  r = commonsense.evaluate_commonsense(right, recs, batch_size=4, return_outputs=True)
  assert r["accuracy"] == 1.0 and r["n"] == 11 and calls == [4, 4, 4]
  assert r["per_task"] == {"ARC-Easy": {"accuracy": 1.0, "n": 6},
                           "boolq": {"accuracy": 1.0, "n": 5}}
  assert [o["prediction"] for o in r["outputs"]] == [x["answer"] for x in recs]
  assert commonsense.evaluate_commonsense(wrong, recs, batch_size=3)["accuracy"] == 0.0
  half = commonsense.evaluate_commonsense(lambda ps: ["true"] * len(ps), recs[:5], "boolq")
  assert half["accuracy"] == np.mean([x["answer"] == "true" for x in recs[:5]])
  with pytest.raises(ValueError, match="no 'task'"):
    commonsense.evaluate_commonsense(right, [dict(recs[0], task=None)])


# The config key of each causal-LM family's position-table size.
POSITIONS = {"llama": "max_position_embeddings", "gpt2": "n_positions"}
SHORT = commonsense.generate_prompt("is the sky blue?")
LONG = commonsense.generate_prompt("is the sky blue on a clear summer day in the mountains?")


@functools.lru_cache(maxsize=None)   # a Backbone is immutable; building one costs seconds
def _tiny_lm(family, positions):
  # No bos/eos in the config, so torch's generation_config stops only where a test tells it to.
  vocab = commonsense_tokenizer().vocab_size
  cfg = models.tiny_config(family, vocab_size=vocab, bos_token_id=None, eos_token_id=None,
                           **{POSITIONS[family]: positions})
  return models.from_config(cfg, "causal_lm")


@pytest.mark.parametrize("family", sorted(POSITIONS))
def test_make_generate_fn_on_a_tiny_lm(family, tokenizer):
  bb = _tiny_lm(family, 128)
  # pad_to_multiple_of=1: the short prompt is padded only when batched with the long one.
  gen = commonsense.make_generate_fn(bb, bb.params, tokenizer, max_new_tokens=6,
                                     pad_to_multiple_of=1)
  out = gen([SHORT, LONG])
  assert len(out) == 2 and all(isinstance(o, str) and o for o in out)
  # Right padding with per-row lengths: a prompt's continuation ignores its batch neighbours.
  assert gen([SHORT])[0] == out[0]
  assert gen([LONG])[0] == out[1]
  with pytest.raises(ValueError, match="causal-LM models.Backbone"):
    commonsense.make_generate_fn(bb.model, bb.params, tokenizer)


@pytest.mark.parametrize("family", sorted(POSITIONS))
def test_generate_fn_keeps_prompt_and_answer_inside_the_models_positions(family, tokenizer):
  bb = _tiny_lm(family, 32)
  long = commonsense.generate_prompt("is the sky blue? " * 20)   # far more than 32 tokens
  assert len(commonsense.encode(tokenizer, long)) > 32
  gen = commonsense.make_generate_fn(bb, bb.params, tokenizer, max_new_tokens=4)
  # The prompt is cut to its last 28 tokens (it ends with the response cue), so this runs.
  cut = commonsense.make_generate_fn(bb, bb.params, tokenizer, max_new_tokens=4,
                                     max_prompt_length=28)
  assert gen([long]) == cut([long])
  with pytest.raises(ValueError, match="leaves no room for a prompt"):
    commonsense.make_generate_fn(bb, bb.params, tokenizer, max_new_tokens=32)


@pytest.mark.parametrize("family", sorted(POSITIONS))
def test_generation_matches_torch_generate(family, tokenizer, tmp_path):
  torch = pytest.importorskip("torch")
  import transformers
  from doran_jax.models import generate
  bb = _tiny_lm(family, 128)
  # Perturb every weight (norm scales and biases too) so a wrong or missing term shows.
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map(
      lambda x: x + 0.1 * rng.standard_normal(x.shape).astype(x.dtype), bb.params)
  models.save_pretrained(bb, params, str(tmp_path))
  ref_model = transformers.AutoModelForCausalLM.from_pretrained(
      str(tmp_path), attn_implementation="eager").eval()
  prompts = [SHORT, LONG, commonsense.generate_prompt("why?", "the sky is blue")]
  encoded = [commonsense.encode(tokenizer, p) for p in prompts]
  n = 8

  def torch_new(ids, eos=None):   # each row alone, unpadded, with torch's KV cache
    with torch.no_grad():
      out = ref_model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids),
                               dtype=torch.long), do_sample=False, max_new_tokens=n,
                               pad_token_id=0, eos_token_id=eos)
    return out[0, len(ids):].tolist()

  width = max(len(e) for e in encoded)
  ids = np.zeros((len(encoded), width), np.int32)
  mask = np.zeros_like(ids)
  for i, e in enumerate(encoded):
    ids[i, :len(e)], mask[i, :len(e)] = e, 1

  def ours(eos=None):
    run = jax.jit(functools.partial(generate.greedy_generate, bb.apply, max_new_tokens=n,
                                    eos_token_id=eos))
    return np.asarray(run(params, ids, mask))

  refs = [torch_new(e) for e in encoded]
  out = ours()
  assert out.shape == (3, width + n)
  for row, (e, ref) in enumerate(zip(encoded, refs)):
    assert out[row, len(e):len(e) + n].tolist() == ref
  gen = commonsense.make_generate_fn(bb, params, tokenizer, max_new_tokens=n)
  assert gen(prompts) == [tokenizer.decode(r, skip_special_tokens=True).strip() for r in refs]

  # With an eos: torch stops after it, ours pads after it; the text ends before it.
  eos = refs[0][2]
  stopped = ours(eos)
  for row, e in enumerate(encoded):
    ref = torch_new(e, eos)
    new = stopped[row, len(e):len(e) + n].tolist()
    assert new[:len(ref)] == ref and not any(new[len(ref):])
  config_eos = bb.replace(config=models.HFConfig({**bb.config, "eos_token_id": eos}))
  texts = commonsense.make_generate_fn(config_eos, params, tokenizer, max_new_tokens=n)(prompts)
  for text, ref in zip(texts, refs):
    kept = ref[:ref.index(eos)] if eos in ref else ref
    assert text == tokenizer.decode(kept, skip_special_tokens=True).strip()
