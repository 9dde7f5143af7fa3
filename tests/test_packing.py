"""doran_jax.data.packing: first-fit rows with segment ids, positions restarting per example, no
target across examples; a packed batch trains a tiny Llama or GPT-2 exactly as the unpacked one."""

import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from doran_jax import data, errors, models, tasks
from doran_jax.data import causal, packing


def _examples(lengths, seed=0, vocab=128):
  """Token lists (ids >= 3) with a prompt part (mask 0) and a completion part (mask 1)."""
  rng = np.random.default_rng(seed)
  ids, masks = [], []
  for n in lengths:
    ids.append(rng.integers(3, vocab, n).tolist())
    prompt = int(rng.integers(1, n)) if n > 1 else 0
    masks.append([0] * prompt + [1] * (n - prompt))
  return ids, masks


def test_first_fit_places_each_example_in_the_first_row_with_room():
  assert packing.first_fit([5, 4, 3, 2], 8) == [[0, 2], [1, 3]]
  assert packing.first_fit([8, 1, 7, 2, 6], 8) == [[0], [1, 2], [3, 4]]
  rng = np.random.default_rng(0)
  lengths = rng.integers(1, 33, 200)
  rows = packing.first_fit(lengths, 32)
  assert sorted(i for r in rows for i in r) == list(range(200))      # each example once
  assert all(sum(lengths[r]) <= 32 for r in rows)
  for r in rows:
    assert r == sorted(r)                                            # input order kept
  # First fit: no example fits into an earlier row as that row stood when it was placed.
  for k, row in enumerate(rows):
    for i in row:
      for earlier in rows[:k]:
        before = sum(lengths[j] for j in earlier if j < i)
        assert before + lengths[i] > 32
  assert packing.first_fit(lengths, 32) == rows                      # deterministic
  with pytest.raises(errors.DataError, match="1..32 tokens"):
    packing.first_fit([33], 32)


def test_packed_rows_keep_examples_apart():
  ids, masks = _examples([5, 9, 3, 12, 7, 2, 16, 4], seed=1)
  masks[2] = [1] * len(masks[2])   # a first token marked as target must still be cut
  arrays, stats = packing.pack(ids, masks, 16, pad_id=0)
  rows = packing.first_fit([len(x) for x in ids], 16)
  assert set(arrays) == set(packing.PACKED_KEYS)
  assert all(a.shape == (len(rows), 16) and a.dtype == np.int32 for a in arrays.values())
  seg, pos, loss = arrays["segment_ids"], arrays["position_ids"], arrays["loss_mask"]
  for r, members in enumerate(rows):
    at = 0
    for s, i in enumerate(members, 1):
      n = len(ids[i])
      np.testing.assert_array_equal(arrays["input_ids"][r, at:at + n], ids[i])
      np.testing.assert_array_equal(seg[r, at:at + n], s)
      np.testing.assert_array_equal(pos[r, at:at + n], np.arange(n))
      np.testing.assert_array_equal(loss[r, at + 1:at + n], masks[i][1:])
      assert loss[r, at] == 0          # never the target of the previous example's last token
      at += n
    assert not seg[r, at:].any() and not arrays["attention_mask"][r, at:].any()
    assert not loss[r, at:].any() and not arrays["input_ids"][r, at:].any()
  np.testing.assert_array_equal(arrays["attention_mask"], seg > 0)
  # A target never crosses examples: wherever the next token is another segment's, no loss.
  crossing = seg[:, 1:] != seg[:, :-1]
  assert not (loss[:, 1:] * crossing).any()
  n_tokens = sum(len(x) for x in ids)
  assert stats == {"examples": 8, "rows": len(rows), "tokens": n_tokens,
                   "efficiency": n_tokens / (len(rows) * 16)}
  assert int(arrays["attention_mask"].sum()) == n_tokens
  # The targets kept are the examples' own, less only the one cut at its first token.
  assert int(loss.sum()) == sum(sum(m[1:]) for m in masks)


def test_packing_through_load_dataset(tmp_path, caplog):
  from tests.test_data_sft import _byte_tokenizer   # offline tokenizer with a chat template
  tok = _byte_tokenizer()
  records = [{"prompt": f"Question {i}: " + "x" * (i * 7 % 40), "completion": f"answer {i}"}
             for i in range(24)]
  for split in ("train", "dev"):
    (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  cfg = data.default_data_config("instruction", path=str(tmp_path), max_length=128,
                                 packing=True)
  with caplog.at_level(logging.INFO):
    train = data.load_dataset(cfg, "train", tokenizer=tok)
  evals = data.load_dataset(cfg, "eval", tokenizer=tok)
  plain = data.load_dataset(data.default_data_config("instruction", path=str(tmp_path),
                                                    max_length=128), "train", tokenizer=tok)
  assert f"packed 24 examples into {len(train)} rows of 128 tokens" in caplog.text
  assert "% of row tokens are real" in caplog.text
  assert train.stats["examples"] == 24 and train.stats["rows"] == len(train) < 24 / 2
  assert train.stats["efficiency"] > 2 * plain.stats["efficiency"]
  assert train.examples is None and "segment_ids" in train.arrays
  # Eval keeps one example a row, lined up with its records.
  assert len(evals) == 24 and "segment_ids" not in evals.arrays and len(evals.examples) == 24
  np.testing.assert_array_equal(evals.arrays["input_ids"], plain.arrays["input_ids"])
  # Same tokens and targets, just fewer rows.
  assert train.arrays["attention_mask"].sum() == plain.arrays["attention_mask"].sum()
  assert train.arrays["loss_mask"].sum() == plain.arrays["loss_mask"][:, 1:].sum()
  # Per-host reading: two processes' rows make up the global batch.
  whole = train.batch(3, 4, seed=0)
  parts = [train.batch(3, 4, seed=0, process_index=p, process_count=2) for p in range(2)]
  for k in whole:
    np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), whole[k])


# ------------------------------------------------------------ the model sees the same thing


def _perturbed(family):
  bb = models.from_config(models.tiny_config(family), "causal_lm", seed=0)
  rng = np.random.default_rng(1)   # numpy noise: no compile per leaf shape
  return bb, jax.tree_util.tree_map(
      lambda x: jnp.asarray(np.asarray(x) + 0.05 * rng.standard_normal(x.shape), x.dtype),
      bb.params)


# The decoder families (rotary positions) and GPT-2 (learned positions) have separate attention
# code; both must keep examples apart and restart positions.
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_packed_batch_gives_the_same_losses_and_gradients(family):
  bb, params = _perturbed(family)
  lengths = [7, 20, 5, 13, 31, 3, 9, 16, 11, 24]
  ids, masks = _examples(lengths, seed=2, vocab=bb.config.get("vocab_size"))
  length = 32
  unpacked = causal.pad(ids, masks, length, pad_id=0)
  packed, stats = packing.pack(ids, masks, length, pad_id=0)
  assert stats["rows"] < len(ids)
  rows = packing.first_fit(lengths, length)

  def loss(p, batch):
    """The training loss (mean over target tokens) and, as aux, each target token's loss."""
    logits = bb.apply(p, batch)
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), -1)
    ce = -jnp.take_along_axis(logp, batch["input_ids"][:, 1:, None], -1)[..., 0]
    return (tasks.loss_and_metrics("causal_lm", logits, batch)[0],
            ce * batch["loss_mask"][:, 1:])

  grad_fn = jax.jit(jax.value_and_grad(loss, has_aux=True))
  (l_u, tok_u), g_u = grad_fn(params, unpacked)
  (l_p, tok_p), g_p = grad_fn(params, packed)
  # Per-example summed losses: row i of the unpacked batch vs its segment of the packed one.
  per_row = np.asarray(tok_u).sum(1)
  seg_targets = packed["segment_ids"][:, 1:]
  per_example = np.zeros(len(ids))
  for r, members in enumerate(rows):
    for s, i in enumerate(members, 1):
      per_example[i] = np.asarray(tok_p)[r][seg_targets[r] == s].sum()
  assert per_row.min() > 0
  np.testing.assert_allclose(per_example, per_row, rtol=1e-5)
  # The training loss and its gradients.
  np.testing.assert_allclose(l_p, l_u, rtol=1e-5)
  np.testing.assert_allclose(l_u, per_row.sum() / unpacked["loss_mask"][:, 1:].sum(), rtol=1e-5)
  flat_u, flat_p = jax.tree_util.tree_leaves(g_u), jax.tree_util.tree_leaves(g_p)
  assert max(float(jnp.abs(g).max()) for g in flat_u) > 1e-3
  for a, b in zip(flat_u, flat_p):
    np.testing.assert_allclose(b, a, atol=1e-5, rtol=1e-4)
  # One segment per row lets the examples see each other: the check above can fail.
  leaky = dict(packed, segment_ids=(packed["segment_ids"] > 0).astype(np.int32))
  assert not np.allclose(grad_fn(params, leaky)[0][0], l_u, rtol=1e-5)
