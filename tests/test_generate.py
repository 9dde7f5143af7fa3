"""Packed rows and KV-cached generation for our causal LMs (LLaMA family and GPT-2).

Every model here is a tiny random config whose params are perturbed after init (so a missing
bias, norm offset or mask shows). References are independent: a packed row against each of its
sequences run alone; cached generation against the full-recompute loop
(`generate.greedy_generate`, itself checked against torch's `generate` in
test_modeling_decoders.py / test_commonsense.py); sampling filters against NumPy.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from doran_jax import models
from doran_jax.models import generate

# Gemma 3: a window (3) shorter than the sequences, on one layer of two; the other is global.
FAMILIES = {
    "llama": {},
    "mistral": dict(sliding_window=4),
    "qwen3": {},
    "gemma3": dict(sliding_window=3, layer_types=["sliding_attention", "full_attention"],
                   final_logit_softcapping=3.0),
    "gpt2": {},
}


def _perturbed(params, seed=1):
  leaves, tree = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree_util.tree_unflatten(tree, [x + 0.1 * jax.random.normal(k, x.shape, x.dtype)
                                             for x, k in zip(leaves, keys)])


@functools.lru_cache(maxsize=None)   # a Backbone is immutable; building one costs seconds
def _tiny(family):
  cfg = models.tiny_config(family, bos_token_id=None, eos_token_id=None, **FAMILIES[family])
  bb = models.from_config(cfg, "causal_lm")
  return bb.replace(params=_perturbed(bb.params))


# --------------------------------------------------------------------------------- packed rows

@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3", "gpt2"])
def test_packed_row_equals_each_sequence_alone(family):
  bb = _tiny(family)
  apply = jax.jit(bb.apply)
  rng = np.random.RandomState(0)
  a, b = rng.randint(1, 128, 5), rng.randint(1, 128, 3)
  # Row 0 packs a and b then one pad; row 1 packs b then a (order must not matter).
  ids = np.array([[*a, *b, 0], [*b, *a, 0]], np.int32)
  seg = np.array([[1] * 5 + [2] * 3 + [0], [1] * 3 + [2] * 5 + [0]], np.int32)
  pos = np.array([[*range(5), *range(3), 0], [*range(3), *range(5), 0]], np.int32)
  packed = np.asarray(apply(bb.params, {"input_ids": ids, "segment_ids": seg,
                                           "position_ids": pos, "attention_mask": seg > 0}))
  alone_a = np.asarray(apply(bb.params, {"input_ids": a[None]}))[0]
  alone_b = np.asarray(apply(bb.params, {"input_ids": b[None]}))[0]
  tol = dict(rtol=1e-5, atol=1e-5 * np.abs(alone_a).max())
  np.testing.assert_allclose(packed[0, :5], alone_a, **tol)
  np.testing.assert_allclose(packed[0, 5:8], alone_b, **tol)
  np.testing.assert_allclose(packed[1, :3], alone_b, **tol)
  np.testing.assert_allclose(packed[1, 3:8], alone_a, **tol)
  # Positions derived from the segment ids when the batch has none: the same logits.
  derived = np.asarray(apply(bb.params, {"input_ids": ids, "segment_ids": seg}))
  np.testing.assert_allclose(derived[:, :8], packed[:, :8], **tol)
  # Without the segment ids the second sequence would see the first: the check can fail.
  unpacked = np.asarray(apply(bb.params, {"input_ids": ids, "position_ids": pos}))
  assert np.abs(unpacked[0, 5:8] - alone_b).max() > 1e-3


def test_segment_positions_and_mask():
  from doran_jax.models.modeling import layers
  seg = jnp.array([[1, 1, 1, 2, 2, 0], [3, 3, 0, 0, 0, 0]])
  np.testing.assert_array_equal(layers.segment_positions(seg),
                                [[0, 1, 2, 0, 1, 0], [0, 1, 0, 1, 2, 3]])
  mask = np.asarray(layers.segment_mask(seg))
  assert mask.shape == (2, 1, 6, 6)
  expect = np.zeros((6, 6), bool)
  expect[:3, :3] = expect[3:5, 3:5] = True
  np.testing.assert_array_equal(mask[0, 0], expect)


# ------------------------------------------------------------------------- KV-cached generation

def _prompts(lengths, seed=0):
  rng = np.random.RandomState(seed)
  return [rng.randint(1, 128, n).tolist() for n in lengths]


def _reference(apply_fn, params, prompts, n, eos=None):
  """Each row's new tokens from the full-recompute loop (right-padded prompts)."""
  width = max(len(p) for p in prompts)
  ids = np.zeros((len(prompts), width), np.int32)
  mask = np.zeros_like(ids)
  for i, p in enumerate(prompts):
    ids[i, :len(p)], mask[i, :len(p)] = p, 1
  run = jax.jit(functools.partial(generate.greedy_generate, apply_fn, max_new_tokens=n,
                                  eos_token_id=eos))
  out = np.asarray(run(params, ids, mask))
  return np.stack([out[i, len(p):len(p) + n] for i, p in enumerate(prompts)])


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_cached_greedy_equals_full_recompute(family):
  bb = _tiny(family)
  n = 10
  prompts = _prompts([9, 3, 6])   # 9 + 10 > every sliding window here
  ref = _reference(bb.apply, bb.params, prompts, n)
  out = generate.generate(bb, bb.params, prompts, max_new_tokens=n, bucket=8)
  assert out.shape == (3, n) and out.dtype == np.int32
  np.testing.assert_array_equal(out, ref)
  # The same prompts right-padded in an array (with their mask): the same tokens.
  ids = np.zeros((3, 9), np.int32)
  mask = np.zeros_like(ids)
  for i, p in enumerate(prompts):
    ids[i, :len(p)], mask[i, :len(p)] = p, 1
  np.testing.assert_array_equal(
      generate.generate(bb, bb.params, ids, attention_mask=mask, max_new_tokens=n, bucket=16), ref)
  # One prompt alone: its row of the batch (no dependence on the neighbours).
  np.testing.assert_array_equal(generate.generate(bb, bb.params, prompts[1], max_new_tokens=n),
                                ref[1])
  # EOS: row 0's first new token after the first one; rows stop after it (pad 0 after), as the
  # reference does.
  at = next((j for j in range(1, n) if ref[0, j] not in ref[0, :j]), 0)
  eos = int(ref[0, at])
  stopped_ref = _reference(bb.apply, bb.params, prompts, n, eos=eos)
  stopped = generate.generate(bb, bb.params, prompts, max_new_tokens=n, eos_token_id=(999, eos),
                              bucket=8)
  np.testing.assert_array_equal(stopped, stopped_ref)
  assert stopped[0, at] == eos and not stopped[0, at + 1:].any()


def test_one_compile_per_prompt_bucket():
  bb = _tiny("llama")
  traces = []

  def apply(params, batch):      # counts traces: runs in Python only while jit traces
    traces.append(batch["input_ids"].shape)
    return bb.apply(params, batch)

  spec = generate.cache_spec(bb)
  run = functools.partial(generate.generate, bb, bb.params, max_new_tokens=6, bucket=16,
                          apply_fn=apply, spec=spec)
  first = run(_prompts([5, 11], seed=1))
  compiled = len(traces)
  assert compiled == 2            # the prefill and the step of one program
  for lengths, seed in [([16, 1], 2), ([3, 9], 3), ([12, 12], 4)]:
    run(_prompts(lengths, seed=seed))
  assert len(traces) == compiled
  np.testing.assert_array_equal(run(_prompts([5, 11], seed=1)), first)
  run(_prompts([17, 2]))           # the next bucket (32 slots): one more program
  assert len(traces) == 2 * compiled and traces[-2] == (2, 32)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_prefill_computes_the_lm_head_at_the_last_position_only(family):
  bb = _tiny(family)
  spec = generate.cache_spec(bb)
  logits_shapes = []

  def apply(params, batch):      # records each call's logits shape while jit traces
    out = bb.apply(params, batch)
    logits_shapes.append(out[0].shape)
    return out

  def ignoring_positions(params, batch):   # a model that returns every position's logits
    return bb.apply(params, {k: v for k, v in batch.items() if k != "logit_positions"})

  prompts = _prompts([9, 3, 6], seed=5)
  ours = generate.generate(bb, bb.params, prompts, max_new_tokens=6, bucket=16, apply_fn=apply,
                           spec=spec)
  vocab = bb.config["vocab_size"]
  assert logits_shapes[0] == (3, 1, vocab)          # the prefill: one position per row
  every = generate.generate(bb, bb.params, prompts, max_new_tokens=6, bucket=16,
                            apply_fn=ignoring_positions, spec=spec)
  np.testing.assert_array_equal(ours, every)
  np.testing.assert_array_equal(ours, _reference(bb.apply, bb.params, prompts, 6))


def test_sampling_limits_keys_and_filters():
  bb = _tiny("qwen3")
  prompts = _prompts([7, 4], seed=5)
  run = functools.partial(generate.generate, bb, bb.params, prompts, max_new_tokens=8)
  greedy = run()
  np.testing.assert_array_equal(run(key=jax.random.key(0), temperature=1e-5), greedy)
  np.testing.assert_array_equal(run(key=jax.random.key(0), top_k=1, temperature=3.0), greedy)
  np.testing.assert_array_equal(run(key=jax.random.key(0), top_p=1e-6, temperature=3.0), greedy)
  hot = functools.partial(run, temperature=5.0)
  a = hot(key=jax.random.key(1))
  np.testing.assert_array_equal(hot(key=jax.random.key(1)), a)
  assert (hot(key=jax.random.key(2)) != a).any()
  with pytest.raises(ValueError, match="temperature > 0"):
    run(key=jax.random.key(0), temperature=0.0)


def test_sampled_tokens_lie_in_the_top_k_set_of_each_steps_logits():
  bb = _tiny("llama")
  prompt = _prompts([6], seed=6)[0]
  k, n = 3, 8
  for seed in range(3):
    new = generate.generate(bb, bb.params, prompt, max_new_tokens=n, key=jax.random.key(seed),
                            temperature=10.0, top_k=k)
    # Step j's logits: the causal forward of prompt + new at the token before new[j].
    seq = np.array([prompt + new.tolist()], np.int32)
    logits = np.asarray(bb.apply(bb.params, {"input_ids": seq}))[0, len(prompt) - 1:-1]
    for j, token in enumerate(new.tolist()):
      assert token in np.argsort(-logits[j])[:k]


def _numpy_filtered(logits, top_k, top_p):
  """The kept set and renormalised probabilities, float64: top-k first, then the nucleus."""
  order = np.argsort(-logits, kind="stable")
  keep = np.zeros(logits.shape, bool)
  keep[order[:top_k or len(logits)]] = True
  p = np.exp(logits - logits.max()) * keep
  p /= p.sum()
  mass = 0.0
  nucleus = np.zeros_like(keep)
  for i in order:
    if not keep[i] or mass >= top_p:
      break
    nucleus[i] = True
    mass += p[i]
  q = p * nucleus
  return nucleus, q / q.sum()


@pytest.mark.parametrize("top_k,top_p", [(0, 0.5), (4, 1.0), (6, 0.8), (0, 0.95), (1, 0.3)])
def test_filter_logits_matches_numpy(top_k, top_p):
  logits = np.random.RandomState(7).normal(0, 2.0, 32)
  keep, probs = _numpy_filtered(logits, top_k, top_p)
  out = np.asarray(generate.filter_logits(jnp.asarray(logits[None]), top_k=top_k, top_p=top_p))[0]
  np.testing.assert_array_equal(np.isfinite(out), keep)
  assert 1 <= keep.sum() < 32
  np.testing.assert_allclose(np.asarray(jax.nn.softmax(out)), probs, atol=1e-6)
  # Draws from the filtered logits: only kept tokens, at their renormalised frequencies.
  draws = np.asarray(jax.random.categorical(jax.random.key(0), jnp.asarray(out), shape=(4000,)))
  assert keep[draws].all()
  freq = np.bincount(draws, minlength=32) / len(draws)
  np.testing.assert_allclose(freq, probs, atol=0.03)


def test_factored_adapters_on_a_quantised_base():
  import doran_jax as dj
  from doran_jax import evaluate
  cfg = models.tiny_config("llama", hidden_size=64, num_attention_heads=4, bos_token_id=None,
                           eos_token_id=None)
  bb = models.from_config(cfg, "causal_lm", quantize="int8")
  adapter_cfg = dj.AdapterConfig(method="dora", rank=4, targets=r".*/(q_proj|v_proj)/kernel",
                                 mode="factored")
  adapters = _perturbed(dj.init_adapters(jax.random.key(0), bb.params, adapter_cfg), seed=3)
  apply = evaluate.factored_apply(bb.apply, adapter_cfg)
  params = {"params": bb.params, "adapters": adapters}
  prompts = _prompts([5, 8], seed=8)
  ref = _reference(apply, params, prompts, 8)
  out = generate.generate(bb, params, prompts, max_new_tokens=8, apply_fn=apply, bucket=8)
  np.testing.assert_array_equal(out, ref)
  # The adapters change the output (so the check above sees them).
  assert (generate.generate(bb, bb.params, prompts, max_new_tokens=8, bucket=8) != ref).any()


def test_bad_prompts_are_clear_errors():
  bb = _tiny("gpt2")
  with pytest.raises(ValueError, match="no tokens"):
    generate.generate(bb, bb.params, np.ones((2, 4), np.int32),
                      attention_mask=np.array([[1, 1, 0, 0], [0, 0, 0, 0]]))
  with pytest.raises(ValueError, match="positions"):
    generate.generate(bb, bb.params, [[1] * 60], max_new_tokens=8)   # 64 positions
  with pytest.raises(ValueError, match="supports the model types .*; got 'bert'"):
    generate.cache_spec(models.from_config(models.tiny_config("bert"), "features"))


@pytest.mark.slow
def test_smollm2_cached_greedy_equals_full_recompute_and_answers():
  bb = models.load_backbone("smollm2", "causal_lm")
  tok = models.load_tokenizer("smollm2")
  questions = ["What is the capital of France?", "Name a primary colour."]
  prompts = [tok(tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                         add_generation_prompt=True),
                 add_special_tokens=False)["input_ids"] for q in questions]
  n, eos = 20, tok.eos_token_id
  ref = _reference(bb.apply, bb.params, prompts, n, eos=eos)
  # The config pads with its pad id (here EOS itself); the reference with 0.
  out = generate.generate(bb, bb.params, prompts, max_new_tokens=n, eos_token_id=eos,
                          pad_token_id=0)
  np.testing.assert_array_equal(out, ref)
  first = out[0].tolist()
  answer = tok.decode(first[:first.index(eos)] if eos in first else first,
                      skip_special_tokens=True)
  assert "Paris" in answer, answer
