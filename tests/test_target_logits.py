"""data.target_logits_only: the causal LM's head runs only at the positions whose next token is a
target, and training, evaluation and resume see the same loss, gradients and metrics as with the
(B, T, V) logits everywhere."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from doran_jax import experiment, models, tasks
from doran_jax import run as run_lib
from doran_jax.data import causal, packing
from tests.test_packing import _examples, _perturbed
from tests.test_trainer import tiny_config


def test_target_positions_against_a_loop():
  rng = np.random.default_rng(0)
  mask = (rng.random((6, 20)) < 0.3).astype(np.int32)
  mask[2] = 0                                            # a row without targets
  k = int(mask[:, 1:].sum(1).max())
  got = causal.target_positions(mask, k)
  assert got.shape == (6, k) and got.dtype == np.int32
  for row, positions in zip(mask, got):
    want = [t for t in range(19) if row[t + 1]]
    assert positions.tolist() == want + [19] * (k - len(want))


def test_the_transform_sizes_k_from_the_busiest_row_and_stays_off_when_most_positions_count():
  mask = np.zeros((3, 64), np.int32)
  mask[0, 10:13] = 1                                      # 3 targets, predicted from 9, 10, 11
  mask[1, 40:51] = 1                                      # 11 targets: the busiest row
  add = causal.target_positions_transform(mask)
  batch = add({"loss_mask": mask, "input_ids": np.zeros((3, 64), np.int32)})
  assert batch["logit_positions"].shape == (3, 16)        # 11 rounded up to a multiple of 8
  assert batch["logit_positions"][0, :4].tolist() == [9, 10, 11, 63]
  assert causal.logit_positions_per_row(mask) == 16
  assert causal.target_positions_transform(np.ones((2, 24), np.int32)) is None   # 23 of 24
  assert causal.logit_positions_per_row(np.ones((2, 24), np.int32)) is None


# The decoder families and GPT-2 each gather before their own LM head (tied and untied).
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_loss_metrics_and_gradients_equal_the_full_logits(family):
  bb, params = _perturbed(family)
  ids, masks = _examples([7, 20, 5, 13, 31, 3, 9, 16, 11, 24], seed=3,
                         vocab=bb.config.get("vocab_size"))
  full, _ = packing.pack(ids, masks, 32, pad_id=0)
  k = int(full["loss_mask"][:, 1:].sum(1).max())
  sparse = {**full, "logit_positions": causal.target_positions(full["loss_mask"], k)}
  assert k < 32

  def loss(p, batch):
    return tasks.loss_and_metrics("causal_lm", bb.apply(p, batch), batch)

  (l_full, m_full), g_full = jax.value_and_grad(loss, has_aux=True)(params, full)
  (l_sparse, m_sparse), g_sparse = jax.value_and_grad(loss, has_aux=True)(params, sparse)
  assert bb.apply(params, sparse).shape[1] == k
  np.testing.assert_allclose(l_sparse, l_full, rtol=1e-6)
  assert float(m_sparse["tokens"]) == float(m_full["tokens"]) == full["loss_mask"][:, 1:].sum()
  assert float(m_sparse["token_correct"]) == float(m_full["token_correct"])
  for a, b in zip(jax.tree_util.tree_leaves(g_sparse), jax.tree_util.tree_leaves(g_full)):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-7)


def test_logits_that_ignore_the_positions_are_refused():
  batch = {"input_ids": jnp.zeros((2, 8), jnp.int32), "loss_mask": jnp.ones((2, 8), jnp.int32),
           "logit_positions": jnp.zeros((2, 3), jnp.int32)}
  with pytest.raises(ValueError, match=r"logits \(2, 8, 5\) do not match the targets \(2, 3\)"):
    tasks.loss_and_metrics("causal_lm", jnp.zeros((2, 8, 5)), batch)


def _train(shared_data, workdir, on: bool, **overrides):
  c = tiny_config(shared_data, workdir, "kind=causal,method=dora", num_steps=4,
                  **{"data.target_logits_only": on, "data.packing": True, "generate.enabled": False,
                     "optim.lr": 1e-2, **overrides})
  return c, experiment.train(c)


def test_training_and_eval_match_the_full_logits_and_resume_across_the_switch(shared_data,
                                                                               tmp_path):
  c_on, on = _train(shared_data, tmp_path / "on", True)
  run = run_lib.setup(c_on)
  batch = run.train_data.batch(0, c_on.batch_size, seed=c_on.seed)
  t = batch["input_ids"].shape[1]
  assert 0 < batch["logit_positions"].shape[1] <= t // 2   # short answers: a fraction of the row
  evals = next(run.eval_data.eval_batches(c_on.eval_batch_size))
  assert evals["logit_positions"].shape[1] <= t // 2
  _, off = _train(shared_data, tmp_path / "off", False)
  np.testing.assert_allclose([h["loss"] for h in on["history"]],
                             [h["loss"] for h in off["history"]], rtol=1e-5)
  np.testing.assert_allclose(on["eval"]["eval_loss"], off["eval"]["eval_loss"], rtol=1e-5)
  assert on["eval"]["token_accuracy"] == off["eval"]["token_accuracy"]
  # A run started with the full logits resumes with the switch on (it is not part of the run's
  # identity) and continues with the uninterrupted run's losses.
  common = {"data.packing": True, "generate.enabled": False, "optim.lr": 1e-2,
            "checkpoint.every": 2, "num_steps": 4}
  first = experiment.train(tiny_config(shared_data, tmp_path / "switched", "kind=causal,method=dora",
                                       **common, **{"data.target_logits_only": False}), max_steps=2)
  assert first["status"] == "paused"
  rest = experiment.train(tiny_config(shared_data, tmp_path / "switched", "kind=causal,method=dora",
                                      **common, **{"data.target_logits_only": True}))
  assert rest["status"] == "done" and [h["step"] for h in rest["history"]] == [3, 4]
  np.testing.assert_allclose([h["loss"] for h in rest["history"]],
                             [h["loss"] for h in off["history"][2:]], rtol=1e-5)
