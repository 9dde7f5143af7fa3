"""tasks.py's losses: the causal-LM cross-entropy's custom VJP against NumPy float64 and against
the optax + argmax formula it replaced, on random, tied and masked logits."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from doran_jax import tasks
from test_factored import assert_close


def _logits(seed, shape, scale=3.0, dtype=jnp.float32):
  return (scale * jax.random.normal(jax.random.key(seed), shape)).astype(dtype)


def _reference(logits, labels):
  """-log softmax(x)[label] and its gradient softmax(x) - onehot, in float64."""
  x = np.asarray(logits, np.float64)
  m = x.max(-1, keepdims=True)
  lse = m[..., 0] + np.log(np.exp(x - m).sum(-1))
  labels = np.asarray(labels)
  ce = lse - np.take_along_axis(x, labels[..., None], -1)[..., 0]
  grad = np.exp(x - lse[..., None]) - (np.arange(x.shape[-1]) == labels[..., None])
  return ce, grad


def test_cross_entropy_and_its_gradient_match_float64():
  logits = _logits(0, (3, 5, 97), scale=20.0)   # large logits: log-sum-exp must be stable
  labels = jax.random.randint(jax.random.key(1), (3, 5), 0, 97)
  w = jax.random.normal(jax.random.key(2), (3, 5))
  ce, correct = tasks.softmax_cross_entropy(logits, labels)
  ref_ce, ref_grad = _reference(logits, labels)
  assert_close(ce, ref_ce, 1e-6, "ce")
  grad = jax.grad(lambda x: jnp.sum(tasks.softmax_cross_entropy(x, labels)[0] * w))(logits)
  # exp(x - lse) at |x| ~ 60: float32 rounding of lse scales the probabilities by ~1e-6.
  assert_close(grad, ref_grad * np.asarray(w)[..., None], 1e-5, "d ce / d logits")
  np.testing.assert_array_equal(correct, np.argmax(np.asarray(logits), -1) == np.asarray(labels))


def test_accuracy_follows_argmax_first_index_on_ties():
  # Rows whose max is shared: argmax is the lowest index holding it.
  x = np.full((4, 6), -1.0, np.float32)
  x[:, 1] = x[:, 4] = 2.0
  labels = np.array([1, 4, 0, 1])
  _, correct = tasks.softmax_cross_entropy(jnp.asarray(x), jnp.asarray(labels))
  np.testing.assert_array_equal(correct, [1.0, 0.0, 0.0, 1.0])
  np.testing.assert_array_equal(correct, np.argmax(x, -1) == labels)
  # bf16 logits tie often; the statistics run in float32 and the gradient keeps the dtype.
  xb = _logits(3, (8, 64), scale=0.05, dtype=jnp.bfloat16)
  lb = jnp.argmax(xb, -1)
  _, correct = tasks.softmax_cross_entropy(xb, lb)
  assert np.all(np.asarray(correct) == 1.0)
  g = jax.grad(lambda v: tasks.softmax_cross_entropy(v, lb)[0].sum())(xb)
  assert g.dtype == jnp.bfloat16


def _optax_loss(logits, batch):
  """The causal-LM loss and metrics as tasks.py computed them before the custom VJP."""
  logits_BxTxV = logits[:, :-1].astype(jnp.float32)
  targets_BxT = batch["input_ids"][:, 1:]
  mask_BxT = batch["loss_mask"][:, 1:].astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV, targets_BxT)
  n = jnp.maximum(mask_BxT.sum(), 1.0)
  correct = (jnp.argmax(logits_BxTxV, -1) == targets_BxT) * mask_BxT
  return (ce * mask_BxT).sum() / n, {"tokens": mask_BxT.sum(), "token_correct": correct.sum()}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_causal_lm_loss_equals_the_optax_formula(dtype):
  b, t, v = 3, 9, 50
  logits = _logits(4, (b, t, v), dtype=dtype)
  ids = jax.random.randint(jax.random.key(5), (b, t), 0, v)
  # Some targets are the argmax (so token_correct counts something), padding masked out.
  ids = ids.at[:, 3].set(jnp.argmax(logits[:, 2], -1))
  mask = jnp.ones((b, t), jnp.int32).at[0, 6:].set(0).at[2, :2].set(0)
  batch = {"input_ids": ids, "loss_mask": mask}
  ours = jax.value_and_grad(lambda x: tasks.loss_and_metrics("causal_lm", x, batch),
                            has_aux=True)(logits)
  ref = jax.value_and_grad(lambda x: _optax_loss(x, batch), has_aux=True)(logits)
  (loss, aux), grad = ours
  (ref_loss, ref_aux), ref_grad = ref
  assert_close(loss, ref_loss, 1e-6, "loss")
  assert aux["tokens"] == ref_aux["tokens"] == mask[:, 1:].sum()
  assert aux["token_correct"] == ref_aux["token_correct"] >= b
  assert grad.dtype == logits.dtype
  # The last position predicts nothing: its gradient is exactly zero, as the slice gave.
  assert np.abs(np.asarray(grad[:, -1], np.float32)).max() == 0
  assert_close(grad, ref_grad, 1e-6 if dtype == jnp.float32 else 1e-2, "d loss / d logits")
