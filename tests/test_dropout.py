"""Dropout masks from the keyed index hash (doran_jax.dropout): keep rates, independence between
neighbouring elements, rows and keys, determinism, and the inverted-dropout scaling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from doran_jax import dropout


def _corr(a, b):
  a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
  return float(np.corrcoef(a, b)[0, 1])


@pytest.mark.parametrize("keep_prob", [0.1, 0.5, 0.9])
def test_keep_rate_matches_keep_prob(keep_prob):
  shape = (16, 12, 64, 64)      # 786,432 draws: 5 standard errors is under 0.003
  keep = np.asarray(jax.jit(lambda k: dropout.keep_mask(k, keep_prob, shape))(jax.random.key(3)))
  n = keep.size
  assert keep.dtype == bool and keep.shape == shape
  assert abs(keep.mean() - keep_prob) < 5 * np.sqrt(keep_prob * (1 - keep_prob) / n)
  # Each leading row (batch example) and each trailing column keeps at the same rate.
  per_row = keep.reshape(shape[0], -1).mean(1)
  assert np.all(np.abs(per_row - keep_prob) < 5 * np.sqrt(keep_prob * (1 - keep_prob) * shape[0] / n))


def test_neighbours_rows_and_keys_are_uncorrelated():
  shape = (8, 4, 128, 128)
  key = jax.random.key(0)
  keep = np.asarray(dropout.keep_mask(key, 0.5, shape))
  bound = 5 / np.sqrt(keep.size / 2)
  assert abs(_corr(keep[..., 1:], keep[..., :-1])) < bound          # adjacent in the last axis
  assert abs(_corr(keep[:, :, 1:], keep[:, :, :-1])) < bound         # adjacent rows of a head
  assert abs(_corr(keep[1:], keep[:-1])) < bound                     # the same index, next example
  assert abs(_corr(keep[:, 1:], keep[:, :-1])) < bound               # next head
  other = np.asarray(dropout.keep_mask(jax.random.fold_in(key, 1), 0.5, shape))
  assert abs(_corr(keep, other)) < 5 / np.sqrt(keep.size)
  # Each of the 16 patterns of a 2x2 window of neighbours turns up about 1/16 of the time
  # (overlapping windows: the bound allows twice the independent standard error).
  codes = (keep[..., :-1, :-1] * 8 + keep[..., :-1, 1:] * 4 + keep[..., 1:, :-1] * 2
           + keep[..., 1:, 1:]).ravel()
  freq = np.bincount(codes, minlength=16) / codes.size
  assert np.all(np.abs(freq - 1 / 16) < 10 * np.sqrt((1 / 16) * (15 / 16) / codes.size))


def test_same_key_same_mask_any_key_form_and_jit():
  shape = (3, 5, 7)
  typed = dropout.keep_mask(jax.random.key(42), 0.7, shape)
  np.testing.assert_array_equal(typed, dropout.keep_mask(jax.random.key(42), 0.7, shape))
  np.testing.assert_array_equal(typed, jax.jit(dropout.keep_mask, static_argnums=(1, 2))(
      jax.random.key(42), 0.7, shape))
  raw = dropout.keep_mask(jax.random.PRNGKey(42), 0.7, shape)        # legacy uint32 keys too
  np.testing.assert_array_equal(raw, typed)
  assert not np.array_equal(typed, dropout.keep_mask(jax.random.key(43), 0.7, shape))
  # The seed form (what the attention's custom VJP keeps) draws the same mask.
  np.testing.assert_array_equal(
      typed, dropout.keep_mask_from_seed(dropout.seed(jax.random.key(42)), 0.7, shape))
  assert dropout.keep_mask(jax.random.key(0), 0.5, ()).shape == ()


def test_edge_probabilities_and_inverted_scaling():
  key = jax.random.key(7)
  assert np.all(dropout.keep_mask(key, 1.0, (4, 9)))
  assert not np.any(dropout.keep_mask(key, 0.0, (4, 9)))
  x = jnp.asarray(np.random.default_rng(0).normal(size=(64, 32)), jnp.float32)
  y = np.asarray(dropout.apply(x, key, rate=0.25))
  keep = np.asarray(dropout.keep_mask(key, 0.75, x.shape))
  np.testing.assert_allclose(y, np.where(keep, np.asarray(x) / 0.75, 0.0), rtol=1e-6)
  assert dropout.apply(x, key, rate=0.0) is x
  assert dropout.apply(x.astype(jnp.bfloat16), key, 0.5).dtype == jnp.bfloat16
  with pytest.raises(ValueError, match="keep_prob"):
    dropout.keep_mask(key, 1.5, (2,))
  with pytest.raises(ValueError, match="2\\^32"):
    dropout.keep_mask(key, 0.5, (2, 2**16, 2**16))   # checked before anything is built
