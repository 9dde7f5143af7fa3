"""Multiple-choice log-likelihood scoring (doran_jax.scoring) against a float64 NumPy reference."""

import functools

import jax
import numpy as np
import pytest

from doran_jax import commonsense, models, scoring
from doran_jax.errors import DataError


@functools.lru_cache(maxsize=None)
def _tokenizer():
  import transformers
  return transformers.AutoTokenizer.from_pretrained(models.minilm_path(), bos_token="[CLS]")


def _perturbed_llama(seed=0):
  bb = models.from_config(models.tiny_config("llama", vocab_size=31000, hidden_size=32,
                                             num_hidden_layers=2), "causal_lm", seed=seed)
  leaves, tree = jax.tree_util.tree_flatten(bb.params)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  noisy = [x + 0.05 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
  return bb.replace(params=jax.tree_util.tree_unflatten(tree, noisy))


def _reference_ll(bb, ctx, cont):
  """Float64 log-softmax of one unpadded sequence's logits, summed over the continuation."""
  seq = np.asarray([list(ctx) + list(cont)], np.int32)
  logits = np.asarray(bb.apply(bb.params, {"input_ids": seq, "attention_mask": np.ones_like(seq)}),
                      np.float64)[0]
  logp = logits - logits.max(-1, keepdims=True)
  logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
  start = len(ctx)
  lp = [logp[t - 1, seq[0, t]] for t in range(start, seq.shape[1])]
  greedy = all(np.argmax(logp[t - 1]) == seq[0, t] for t in range(start, seq.shape[1]))
  return float(np.sum(lp)), greedy


def test_encode_pair_splits_the_whole_string_and_moves_trailing_spaces():
  tok = _tokenizer()
  ctx, cont = scoring.encode_pair(tok, "the capital of france is ", "paris")
  assert ctx[0] == tok.bos_token_id
  assert ctx + cont == commonsense.encode(tok, "the capital of france is paris")
  assert tok.decode(cont).strip() == "paris"
  with pytest.raises(DataError, match="adds no token"):
    scoring.encode_pair(tok, "hello", "")


def test_loglikelihoods_match_float64_reference_across_padding_and_buckets():
  tok = _tokenizer()
  bb = _perturbed_llama()
  texts = [("the sky is", " blue"), ("a much longer context about the weather in paris today is",
                                      " rather grey and wet"), ("one", " two three")]
  pairs = [scoring.encode_pair(tok, c, x) for c, x in texts]
  # Batch 2 and bucket 8: rows of different lengths share a padded batch, a batch has a spare row.
  ll_fn = scoring.make_loglikelihood_fn(bb.apply, bb.params, pad_id=0, batch_size=2, bucket=8)
  lls, greedy = ll_fn(pairs)
  for (ctx, cont), ll, g in zip(pairs, lls, greedy):
    ref, ref_greedy = _reference_ll(bb, ctx, cont)
    np.testing.assert_allclose(ll, ref, rtol=1e-5, atol=1e-4)
    assert g == ref_greedy
  # A continuation made of the model's own argmax tokens is greedy.
  ctx = pairs[0][0]
  seq = np.asarray([ctx], np.int32)
  nxt = int(np.argmax(np.asarray(bb.apply(bb.params, {"input_ids": seq,
                                                      "attention_mask": np.ones_like(seq)}))[0, -1]))
  assert ll_fn([(ctx, [nxt])])[1][0]


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2"])
def test_shared_context_scoring_equals_one_sequence_per_choice(family):
  """Choices that share a context run it once into a KV cache: the same scores as full rows."""
  from doran_jax.models import generate as generate_lib
  overrides = dict(vocab_size=300)
  if family == "gemma3":
    overrides["sliding_window"] = 4          # shorter than the contexts: the window matters
  bb = models.from_config(models.tiny_config(family, **overrides), "causal_lm", seed=3)
  leaves, tree = jax.tree_util.tree_flatten(bb.params)
  keys = jax.random.split(jax.random.key(4), len(leaves))
  bb = bb.replace(params=jax.tree_util.tree_unflatten(
      tree, [x + 0.05 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]))
  rng = np.random.default_rng(0)
  pairs = []
  for n_ctx, n_choices in ((9, 3), (3, 2), (14, 4)):
    ctx = rng.integers(1, 300, n_ctx).tolist()
    pairs += [(ctx, rng.integers(1, 300, rng.integers(1, 5)).tolist()) for _ in range(n_choices)]
  plain = scoring.make_loglikelihood_fn(bb.apply, bb.params, bucket=8, batch_size=2)
  shared = scoring.make_loglikelihood_fn(bb.apply, bb.params, bucket=8, batch_size=2,
                                         cache=generate_lib.cache_spec(bb))
  ll_plain, greedy_plain = plain(pairs)
  ll_shared, greedy_shared = shared(pairs)
  # The context's forward computes the LM head at its last position only.
  logits_shapes = []

  def recording(params, batch):
    out = bb.apply(params, batch)
    logits_shapes.append((batch["input_ids"].shape, out[0].shape))
    return out

  scoring.make_loglikelihood_fn(recording, bb.params, bucket=8, batch_size=2,
                                cache=generate_lib.cache_spec(bb))(pairs[:3])
  (ctx_shape, prefill_shape), (_, cont_shape) = logits_shapes[:2]
  assert prefill_shape == (ctx_shape[0], 1, 300), logits_shapes
  assert cont_shape[1] > 1                    # continuations: every position scored
  np.testing.assert_allclose(ll_shared, ll_plain, rtol=1e-5, atol=1e-4)
  np.testing.assert_array_equal(greedy_shared, greedy_plain)
  for (ctx, cont), ll in zip(pairs[:3], ll_shared[:3]):
    np.testing.assert_allclose(ll, _reference_ll(bb, ctx, cont)[0], rtol=1e-5, atol=1e-4)


def test_truncation_keeps_the_continuation_and_drops_context_from_the_left():
  bb = _perturbed_llama()
  ctx, cont = list(range(5, 45)), [7, 8, 9]
  ll_fn = scoring.make_loglikelihood_fn(bb.apply, bb.params, max_length=16, bucket=8)
  ll, _ = ll_fn([(ctx, cont)])
  ref, _ = _reference_ll(bb, ctx[-13:], cont)
  np.testing.assert_allclose(ll[0], ref, rtol=1e-5, atol=1e-4)
  with pytest.raises(DataError, match="does not fit"):
    ll_fn([(ctx, list(range(5, 25)))])


def test_commonsense_choices_come_from_the_answer_format_line(shared_data):
  root = shared_data / "commonsense"
  for task, n in (("boolq", 2), ("piqa", 2), ("winogrande", 2), ("social_i_qa", 3)):
    records = commonsense.load_records(str(root / task / "test.json"), task)[:20]
    for record in records:
      choices = scoring.commonsense_choices(record)
      assert len(choices) == n and record["answer"] in choices
  arc = commonsense.load_records(str(root / "ARC-Easy" / "test.json"), "ARC-Easy")
  assert {len(scoring.commonsense_choices(r)) for r in arc} >= {4, 5}
  bad = dict(arc[0], answer="answer9")
  with pytest.raises(DataError, match="answer9"):
    scoring.commonsense_choices(bad)


def test_multiple_choice_accuracy_and_length_normalisation():
  tok = _tokenizer()
  questions = [scoring.Question("q one", (" a", " bbbbbbbb"), gold=1, task="t1"),
               scoring.Question("q two", (" a", " bb", " ccc"), gold=0, task="t2")]
  # Log-likelihoods chosen so the raw argmax and the per-character argmax disagree on question 1.
  fixed = {"a": -2.0, "bbbbbbbb": -4.0, "bb": -1.0, "ccc": -9.0}

  def ll_fn(pairs):
    words = [tok.decode(cont).strip() for _, cont in pairs]
    return np.array([fixed[w] for w in words]), np.zeros(len(pairs), bool)

  out = scoring.multiple_choice(ll_fn, tok, questions)
  # q1: raw picks ' a' (wrong), per character -2/2 vs -4/9 picks ' bbbbbbbb' (right).
  # q2: raw picks ' bb' (wrong), per character -2/2, -1/3, -9/4 picks ' bb' (wrong).
  assert out["accuracy"] == 0.0 and out["accuracy_norm"] == 0.5 and out["n"] == 2
  assert out["per_task"]["t1"] == {"accuracy": 0.0, "accuracy_norm": 1.0, "n": 1}
  assert "outputs" not in out
  # Per question, for paired tests: the choices behind those counts and their log-likelihoods.
  detail = scoring.multiple_choice(ll_fn, tok, questions, return_outputs=True)
  assert {k: detail[k] for k in out} == out
  assert detail["outputs"] == [
      {"task": "t1", "gold": 1, "choice": 0, "choice_norm": 1, "loglikelihoods": [-2.0, -4.0]},
      {"task": "t2", "gold": 0, "choice": 1, "choice_norm": 1,
       "loglikelihoods": [-2.0, -1.0, -9.0]}]
  with pytest.raises(DataError, match="two continuations"):
    scoring.multiple_choice(ll_fn, tok, [scoring.Question("q", (" a",), 0)])


def test_commonsense_questions_score_the_trained_completion(shared_data):
  records = commonsense.load_records(str(shared_data / "commonsense" / "boolq" / "test.json"),
                                     "boolq")[:3]
  qs = scoring.commonsense_questions(records)
  assert qs[0].continuations == ("the correct answer is true", "the correct answer is false")
  assert qs[0].continuations[qs[0].gold] == records[0]["output"]
  assert qs[0].context == commonsense.generate_prompt(records[0]["instruction"])
