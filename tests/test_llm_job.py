"""The LLM job's pieces end to end on a tiny LLaMA: zero-shot baseline, multiple-choice and
generation scores, perplexity, the summary table, and the chat entry point."""

import math

import jax
import numpy as np
import pytest

from doran_jax import checkpoint, errors, evaluate, experiment, models, scoring
from doran_jax import run as run_lib
from doran_jax.models import generate as generate_lib
from tests.test_trainer import tiny_config

CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}assistant: {% endif %}")


def _llm_config(shared_data, workdir, **overrides):
  return tiny_config(shared_data, workdir, "kind=causal,method=dora", num_steps=3,
                     baselines=("zero_shot",), **{"generate.multiple_choice": True,
                                                  "generate.limit_per_task": 4,
                                                  "optim.lr": 1e-2}, **overrides)


def test_zero_shot_and_fine_tuned_scores(shared_data, tmp_path):
  c = _llm_config(shared_data, tmp_path)
  results = experiment.run_experiment(c)
  zero, tuned = results["baselines"]["zero_shot"], results["eval"]
  for r in (zero, tuned):
    assert r["multiple_choice"]["n"] == 4 and r["commonsense"]["n"] == 4
    assert 0 <= r["multiple_choice"]["accuracy_norm"] <= 1
    assert r["perplexity"] == pytest.approx(math.exp(r["eval_loss"]), rel=1e-6)
  assert zero["eval_loss"] != tuned["eval_loss"]          # training moved the model
  # The zero-shot row is the model as loaded: the same tiny model built alone scores the same.
  run = run_lib.setup(c)
  bb = models.from_config(models.tiny_config("llama", vocab_size=30522), "causal_lm", seed=c.seed)
  records = [r for r in run.eval_data.examples][:4]
  ll_fn = scoring.make_loglikelihood_fn(bb.apply, bb.params, pad_id=run.tokenizer.pad_token_id,
                                        max_length=bb.config["max_position_embeddings"])
  direct = scoring.multiple_choice(ll_fn, run.tokenizer, scoring.commonsense_questions(records))
  assert direct == zero["multiple_choice"]
  table = experiment.summary_table(results)
  assert "mc accuracy" in table and "perplexity" in table and "baseline: zero_shot" in table


def test_zero_shot_is_refused_for_classification(shared_data, tmp_path):
  c = tiny_config(shared_data, tmp_path, "kind=text,method=lora", baselines=("zero_shot",))
  with pytest.raises(errors.ConfigError, match="zero_shot"):
    experiment.run_experiment(c)


def test_chat_replies_with_the_fine_tuned_adapters(shared_data, tmp_path, monkeypatch):
  c = tiny_config(shared_data, tmp_path, "kind=causal,method=lora", num_steps=2,
                  **{"optim.lr": 1e-2})
  experiment.train(c)
  tokenizer = run_lib.load_tokenizer(c)
  with pytest.raises(errors.ConfigError, match="no chat template"):
    experiment.chat(c, "hello", workdir=str(tmp_path))
  tokenizer.chat_template = CHAT_TEMPLATE
  monkeypatch.setattr(run_lib, "load_tokenizer", lambda config: tokenizer)
  reply = experiment.chat(c, "is water wet?", workdir=str(tmp_path), max_new_tokens=6)
  from_export = experiment.chat(c, "is water wet?", adapters_dir=str(tmp_path / "export" / "adapters"),
                                max_new_tokens=6)
  assert reply == from_export
  # The reference: the export's merged weights decoded by the full-recompute greedy loop.
  run = run_lib.setup(c)
  trainable, cfg, _ = checkpoint.load_adapters(str(tmp_path / "export" / "adapters"))
  merged = evaluate.merged_params(run.frozen, trainable, cfg)
  ids = tokenizer.apply_chat_template([{"role": "user", "content": "is water wet?"}],
                                      add_generation_prompt=True, tokenize=True)
  ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
  stops = generate_lib.eos_ids(run.backbone.config.get("eos_token_id"))
  out = np.asarray(generate_lib.greedy_generate(
      run.backbone.apply, merged, np.asarray([ids], np.int32), None, 6,
      eos_token_id=stops, pad_token_id=tokenizer.pad_token_id))[0, len(ids):]
  new = [int(t) for t in out]
  end = next((i for i, t in enumerate(new) if t in stops), len(new))
  assert reply == tokenizer.decode(new[:end], skip_special_tokens=True).strip()
  base = experiment.chat(c, "is water wet?", base=True, max_new_tokens=6)
  assert isinstance(base, str)
