"""Greedy decoding for any of our causal LMs, from its logits function alone (no KV cache).

`greedy_generate` needs only `apply_fn(params, batch) -> logits (B, T, V)` (`Backbone.apply`, or
`lambda p, b: module.apply({"params": p}, b)`), so the LLaMA-family decoder and GPT-2 share it.
It is pure jnp: jit it once with its static arguments bound, and it compiles once per
(batch, prompt length) shape.

Example:
  >>> gen = jax.jit(functools.partial(greedy_generate, bb.apply, max_new_tokens=8, eos_token_id=2))
  >>> out_BxS = gen(bb.params, ids_BxT, mask_BxT)        # right-padded prompts
  >>> new_b = out_BxS[b, len_b:len_b + 8]
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np


def eos_ids(eos_token_id: Union[None, int, Sequence[int]]) -> tuple[int, ...]:
  """The stop ids as a tuple: None -> (), 2 -> (2,), [128001, 128009] -> both (Llama 3 configs).

  Example:
    >>> eos_ids([1, 2])
    (1, 2)
  """
  if eos_token_id is None:
    return ()
  return tuple(int(e) for e in np.atleast_1d(eos_token_id))


def greedy_generate(apply_fn: Callable, params, input_ids, attention_mask=None,
                    max_new_tokens: int = 16, *,
                    eos_token_id: Union[None, int, Sequence[int]] = None, pad_token_id: int = 0):
  """Greedy decoding on a fixed buffer: one full forward of (B, T + N) tokens per new token.

  Prompts are right padded (attention_mask a prefix of ones per row, at least one); row b's new
  tokens go right after its own prompt, at positions len_b, len_b + 1, ..., with the positions of
  a row decoded alone, so its output does not depend on its batch neighbours. After a token of
  `eos_token_id` (an id or several) a row emits `pad_token_id`, as transformers' `generate` does;
  the loop stops once every row has. Cost grows as (T + N)^2 per step: fine for
  evaluation-sized outputs. T + N must fit the model's positions (GPT-2's `n_positions`).

  Args:
    apply_fn: (params, batch) -> logits (B, S, V); batch has input_ids, attention_mask (bool)
      and position_ids (a model that ignores them counts 0..S-1, the same at every real token).
    params: passed to apply_fn as is.
    input_ids: (B, T) prompts, right padded.
    attention_mask: (B, T), 1 on prompt tokens; None = all ones.
    max_new_tokens: N (static).

  Returns:
    (B, T + N) int32 tokens: row b holds its prompt, then its N new tokens, then padding.

  Example:
    >>> out = jax.jit(lambda p, i, m: greedy_generate(bb.apply, p, i, m, 8))(params, ids, mask)
    >>> new_b = out[b, len_b:len_b + 8]
  """
  ids_BxT = jnp.asarray(input_ids, jnp.int32)
  b, t = ids_BxT.shape
  mask_BxT = (jnp.ones((b, t), jnp.int32) if attention_mask is None
              else jnp.asarray(attention_mask, jnp.int32))
  s = t + max_new_tokens
  stops_E = jnp.asarray(eos_ids(eos_token_id), jnp.int32)
  slots_S = jnp.arange(s, dtype=jnp.int32)
  rows_B = jnp.arange(b)

  def keep_going(carry):
    step, _, _, done_B = carry
    return (step < max_new_tokens) & ~done_B.all()

  def one_token(carry):
    step, tokens_BxS, lengths_B, done_B = carry
    # Slots past the longest row are masked keys; clamping their positions keeps them inside
    # GPT-2's position table and max(position_ids) + 1 equal to the true length ('dynamic' rope).
    positions_BxS = jnp.broadcast_to(jnp.minimum(slots_S, lengths_B.max() - 1), (b, s))
    batch = {"input_ids": tokens_BxS, "attention_mask": slots_S[None] < lengths_B[:, None],
             "position_ids": positions_BxS}
    logits_BxSxV = apply_fn(params, batch)
    last_B = jnp.maximum(lengths_B - 1, 0)
    last_BxV = jnp.take_along_axis(logits_BxSxV, last_B[:, None, None], axis=1)[:, 0]
    next_B = jnp.argmax(last_BxV.astype(jnp.float32), axis=-1).astype(jnp.int32)
    next_B = jnp.where(done_B, pad_token_id, next_B)
    tokens_BxS = tokens_BxS.at[rows_B, lengths_B].set(next_B)
    done_B = done_B | jnp.isin(next_B, stops_E)
    return step + 1, tokens_BxS, lengths_B + 1, done_B

  lengths_B = mask_BxT.sum(-1).astype(jnp.int32)
  tokens_BxS = jnp.full((b, s), pad_token_id, jnp.int32)
  tokens_BxS = tokens_BxS.at[:, :t].set(jnp.where(mask_BxT > 0, ids_BxT, pad_token_id))
  # A while loop, not fori: evaluation answers are short, so most batches stop well before N.
  carry = (jnp.int32(0), tokens_BxS, lengths_B, jnp.zeros((b,), bool))
  return jax.lax.while_loop(keep_going, one_token, carry)[1]
