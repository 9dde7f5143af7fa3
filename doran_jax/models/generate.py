"""Generation for our causal LMs (LLaMA family, GPT-2): KV-cached decoding, and the reference loop.

`generate` (and its jittable core `cached_generate`) prefills the prompt once into a KV cache,
then computes one token per step against it: static shapes, one compile per (batch, prompt
bucket, settings). The cache is a plain pytree, one {'k', 'v'} of (B, S, K, D) per layer, passed
to the model in the batch (`cache`, `cache_index`) and returned updated with the logits, so any
apply function that forwards the batch works: `Backbone.apply`, or the factored-adapter apply of
`evaluate.params_and_apply` on a quantised base. Greedy without a key; with a key, sampling with
temperature, top-k and top-p. Rows stop on any EOS id and are padded after it.

`greedy_generate` is the reference: no cache, one full forward of (B, T + N) tokens per new
token. It needs only `apply_fn(params, batch) -> logits (B, T, V)`; the tests compare the cached
path with it token for token.

Example:
  >>> out_BxN = generate(bb, params, prompt_ids, max_new_tokens=64)                  # greedy
  >>> out_BxN = generate(bb, params, prompt_ids, max_new_tokens=64, key=key,
  ...                    temperature=0.7, top_p=0.9)
  >>> gen = jax.jit(functools.partial(greedy_generate, bb.apply, max_new_tokens=8, eos_token_id=2))
  >>> out_BxS = gen(bb.params, ids_BxT, mask_BxT)        # the reference; right-padded prompts
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

from doran_jax import xla_cpu
from doran_jax.errors import ConfigError
from doran_jax.models import registry


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
  """The reference greedy decoding: no cache, one full forward of (B, T + N) tokens per new token.

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
    (B, T + N) int32 tokens; row b holds its prompt, then its N new tokens, then padding.

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


# ------------------------------------------------------------------------------ KV-cached decoding

@dataclasses.dataclass(frozen=True)
class CacheSpec:
  """The KV cache of one model: `num_layers` × {'k', 'v'} of (B, S, num_kv_heads, head_dim).

  Hashable, so it can be a static argument of `cached_generate` under jit.

  Example:
    >>> cache = cache_spec(bb).init(4, 128)     # 4 rows, 128 slots
  """

  num_layers: int
  num_kv_heads: int
  head_dim: int
  dtype: str = "float32"

  def init(self, batch: int, length: int) -> tuple:
    """Zeros: one {'k', 'v'} (batch, length, K, D) per layer.

    Example:
      >>> cache = CacheSpec(num_layers=2, num_kv_heads=4, head_dim=16).init(3, 32)
      >>> len(cache), cache[0]["k"].shape
      (2, (3, 32, 4, 16))
    """
    shape = (batch, length, self.num_kv_heads, self.head_dim)
    return tuple({"k": jnp.zeros(shape, self.dtype), "v": jnp.zeros(shape, self.dtype)}
                 for _ in range(self.num_layers))


def cache_spec(backbone, dtype=None, params=None) -> CacheSpec:
  """The cache of a causal-LM backbone (anything with `.config`, its transformers config dict).

  The cache holds keys and values in the model's compute dtype: `dtype`, else the module's
  (`backbone.model.dtype`), else the dtype of the logits `backbone.apply(params, ...)` returns
  (traced abstractly, no compute; `params` defaults to `backbone.params`).

  Example:
    >>> cache_spec(models.load_backbone("smollm2", "causal_lm"))
    CacheSpec(num_layers=30, num_kv_heads=3, head_dim=64, dtype='float32')
  """
  cfg = dict(backbone.config)
  family = registry.for_model_type(cfg.get("model_type"))
  if family.cache_shape is None:
    cached = sorted(t for name in registry.names() for t in registry.get(name).model_types
                    if registry.get(name).cache_shape is not None)
    raise ConfigError(f"KV-cached generation supports the model types {', '.join(cached)}; got "
                      f"{cfg.get('model_type')!r} (family {family.name!r}).")
  layers, heads, head_dim = family.cache_shape(cfg)
  if dtype is None:
    dtype = getattr(getattr(backbone, "model", None), "dtype", None)
  if dtype is None:
    ids = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    params = getattr(backbone, "params", None) if params is None else params
    if params is None:
      raise ConfigError("cache_spec needs the compute dtype: pass dtype= for a backbone without "
                        "a module or params.")
    dtype = jax.eval_shape(lambda p, i: backbone.apply(p, {"input_ids": i}), params, ids).dtype
  return CacheSpec(layers, heads, head_dim, jnp.dtype(dtype).name)


def filter_logits(logits_BxV, *, top_k: int = 0, top_p: float = 1.0):
  """Logits outside the top-k, then outside the top-p nucleus, set to -inf (float32).

  top_k = 0 and top_p = 1 keep everything. The nucleus is the smallest set of the most likely
  tokens whose probability reaches top_p (always at least the most likely one), computed after
  top-k, as transformers' TopKLogitsWarper then TopPLogitsWarper do; ties at a threshold are kept.

  Example:
    >>> filter_logits(jnp.log(jnp.array([[0.5, 0.3, 0.2]])), top_p=0.7)   # keeps 0.5 and 0.3
  """
  logits_BxV = jnp.asarray(logits_BxV, jnp.float32)
  v = logits_BxV.shape[-1]
  if 0 < top_k < v:
    kth_Bx1 = jax.lax.top_k(logits_BxV, top_k)[0][:, -1:]
    logits_BxV = jnp.where(logits_BxV >= kth_Bx1, logits_BxV, -jnp.inf)
  if top_p < 1.0:
    sorted_BxV = -jnp.sort(-logits_BxV, axis=-1)
    probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
    # Mass strictly before each token: a token is kept while that mass is below top_p.
    before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
    kept_BxV = (before_BxV < top_p).at[:, 0].set(True)
    floor_Bx1 = jnp.min(jnp.where(kept_BxV, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
    logits_BxV = jnp.where(logits_BxV >= floor_Bx1, logits_BxV, -jnp.inf)
  return logits_BxV


def _left_aligned(ids_BxT, mask_BxT):
  """Each row's real tokens moved to its end, in order (padding first): one write slot for all."""
  order_BxT = jnp.argsort(mask_BxT, axis=-1, stable=True)
  return (jnp.take_along_axis(ids_BxT, order_BxT, axis=-1),
          jnp.take_along_axis(mask_BxT, order_BxT, axis=-1))


def cached_generate(apply_fn: Callable, spec: CacheSpec, params, input_ids, attention_mask=None,
                    key: Optional[jax.Array] = None, *, max_new_tokens: int = 64,
                    eos_token_id: Union[None, int, Sequence[int]] = None, pad_token_id: int = 0,
                    temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
  """KV-cached decoding, pure and jittable: a prefill of the prompts, then one token per step.

  Prompts may be padded on either side: each row's real tokens (attention_mask 1) are moved to
  the end of the buffer, so the prompt fills slots up to P and every row writes its n-th new
  token at slot P + n; positions count real tokens only (cumsum(mask) - 1), and padded slots are
  masked keys. So a row's tokens are those it gets decoded alone (up to float rounding in the
  batched matmuls). A row that emits an id of `eos_token_id` then emits `pad_token_id`; the loop
  (a lax.while_loop) ends when every row has stopped or after N tokens.

  Args:
    apply_fn: (params, batch) -> (logits (B, T, V), cache) when the batch holds `cache` and
      `cache_index` (`Backbone.apply`, `evaluate.factored_apply(...)`), batch keys input_ids,
      attention_mask (over the cache's slots), position_ids; the prefill's batch also has
      logit_positions (B, 1) (its last position: logits (B, 1, V) there, or every position from
      a model that ignores the key). Static under jit.
    spec: the model's `CacheSpec` (static).
    params: passed to apply_fn as is.
    input_ids: (B, P) int prompts.
    attention_mask: (B, P), 1 on prompt tokens (at least one per row); None = all ones.
    key: None = greedy; else the sampling key (step n draws with fold_in(key, n)).
    max_new_tokens: N (static).
    eos_token_id: an id, several, or None (never stop early).
    pad_token_id: emitted after a row's EOS.
    temperature, top_k, top_p: sampling only (static): logits / temperature, then
      `filter_logits`.

  Returns:
    (B, N) int32, each row's new tokens, `pad_token_id` after its EOS.

  Example:
    >>> run = jax.jit(cached_generate, static_argnums=(0, 1),
    ...               static_argnames=("max_new_tokens", "eos_token_id"))
    >>> new_BxN = run(bb.apply, cache_spec(bb), params, ids, mask, max_new_tokens=16)
  """
  ids_BxP = jnp.asarray(input_ids, jnp.int32)
  b, p = ids_BxP.shape
  n = int(max_new_tokens)
  mask_BxP = (jnp.ones((b, p), jnp.int32) if attention_mask is None
              else jnp.asarray(attention_mask, jnp.int32))
  ids_BxP, mask_BxP = _left_aligned(ids_BxP, mask_BxP)
  stops_E = jnp.asarray(eos_ids(eos_token_id), jnp.int32)
  lengths_B = mask_BxP.sum(-1)

  def pick(logits_BxV, step):
    logits_BxV = logits_BxV.astype(jnp.float32)
    if key is None:
      return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    logits_BxV = filter_logits(logits_BxV / temperature, top_k=top_k, top_p=top_p)
    return jax.random.categorical(jax.random.fold_in(key, step), logits_BxV).astype(jnp.int32)

  # Prefill: the whole prompt in one call, its keys and values written at slots 0 .. P - 1.
  keys_BxS = jnp.concatenate([mask_BxP, jnp.zeros((b, n), jnp.int32)], axis=1).astype(bool)
  batch = {"input_ids": ids_BxP, "attention_mask": keys_BxS,
           "position_ids": jnp.maximum(jnp.cumsum(mask_BxP, axis=-1) - 1, 0),
           "cache": spec.init(b, p + n), "cache_index": jnp.int32(0),
           # Only the last prompt position's logits are read: the LM head there alone (over a
           # 49k vocabulary it is a fifth of a SmolLM2 prefill's FLOPs at every position).
           "logit_positions": jnp.full((b, 1), p - 1, jnp.int32)}
  logits, cache = apply_fn(params, batch)
  first_B = pick(logits[:, -1], 0)   # (B, 1, V), or (B, P, V) from a model without positions
  tokens_BxN = jnp.full((b, n), pad_token_id, jnp.int32).at[:, 0].set(first_B)
  done_B = jnp.isin(first_B, stops_E)

  def keep_going(carry):
    step, _, _, _, done_B = carry
    return (step < n) & ~done_B.all()

  def one_token(carry):
    # Feeds token step - 1 (at slot P + step - 1) and picks token `step`.
    step, tokens_BxN, keys_BxS, cache, done_B = carry
    slot = p + step - 1
    keys_BxS = jax.lax.dynamic_update_slice(keys_BxS, jnp.ones((b, 1), bool), (0, slot))
    last_Bx1 = jax.lax.dynamic_slice(tokens_BxN, (0, step - 1), (b, 1))
    batch = {"input_ids": last_Bx1, "attention_mask": keys_BxS,
             "position_ids": (lengths_B + step - 1)[:, None], "cache": cache,
             "cache_index": slot}
    logits_Bx1xV, cache = apply_fn(params, batch)
    next_B = jnp.where(done_B, pad_token_id, pick(logits_Bx1xV[:, 0], step))
    tokens_BxN = jax.lax.dynamic_update_slice(tokens_BxN, next_B[:, None], (0, step))
    return step + 1, tokens_BxN, keys_BxS, cache, done_B | jnp.isin(next_B, stops_E)

  carry = (jnp.int32(1), tokens_BxN, keys_BxS, cache, done_B)
  return jax.lax.while_loop(keep_going, one_token, carry)[1]


# doran_jax.xla_cpu switches XLA:CPU's YNNPACK fusions off for the whole process (faster training
# steps). Decoding's dots are skinny (a few rows against each kernel and the (d, V) output
# projection): there plain XLA dots ran 8x slower than YNNPACK's on a 2-core EPYC (a (4, 576) x
# (576, 49152) dot: 64 ms vs 7 ms; SmolLM2, batch 4, 64 new tokens: 14.8 s -> 2.8 s).
# So the decoding program alone is compiled with YNNPACK dots, where that default is in force.
_YNN_OFF = "--xla_cpu_experimental_ynn_fusion_type="
_DECODE_DOTS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}


@functools.lru_cache(maxsize=None)   # one jit object per backend: its cache holds the programs
def _jitted(backend: str, ynn_off: bool):
  """`cached_generate` under jit; one program per (apply_fn, spec, settings) and input shapes,
  so prompts padded to one bucket reuse one compile."""
  options = None
  if backend == "cpu" and ynn_off and jaxlib.__version__.startswith(xla_cpu.MEASURED_JAXLIB):
    options = dict(_DECODE_DOTS)
  return jax.jit(cached_generate, static_argnums=(0, 1),
                 static_argnames=("max_new_tokens", "eos_token_id", "pad_token_id",
                                  "temperature", "top_k", "top_p"),
                 compiler_options=options)


def _cached_generate_jit(*args, **kwargs):
  ynn_off = _YNN_OFF in os.environ.get("XLA_FLAGS", "").split()
  return _jitted(jax.default_backend(), ynn_off)(*args, **kwargs)


def pad_prompts(prompt_ids, attention_mask=None, *, bucket: int = 64, pad_token_id: int = 0):
  """Prompts as a left-padded (B, P) int32 array and its mask, P a multiple of `bucket`.

  `prompt_ids` is a (B, T) array (with `attention_mask`, padding on either side) or a list of
  token lists.

  Example:
    >>> ids, mask = pad_prompts([[5, 6, 7], [8]], bucket=4)
    >>> ids.tolist()
    [[0, 5, 6, 7], [0, 0, 0, 8]]
  """
  if isinstance(prompt_ids, (list, tuple)) and prompt_ids and not np.isscalar(prompt_ids[0]):
    rows = [np.asarray(r, np.int64).reshape(-1) for r in prompt_ids]
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad_token_id, np.int64)
    mask = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
      if len(r):
        ids[i, width - len(r):], mask[i, width - len(r):] = r, 1
  else:
    ids = np.asarray(prompt_ids)
    if ids.ndim == 1:
      ids = ids[None]
    mask = (np.ones(ids.shape, np.int32) if attention_mask is None
            else np.asarray(attention_mask, np.int32).reshape(ids.shape))
  if ids.ndim != 2 or ids.shape[0] == 0 or ids.shape[1] == 0:
    raise ConfigError(f"prompt_ids must be (batch, length) token ids or a list of token lists; "
                      f"got shape {ids.shape}.")
  if (mask.sum(-1) == 0).any():
    raise ConfigError(f"prompts {np.flatnonzero(mask.sum(-1) == 0).tolist()[:8]} have no tokens "
                      "(attention_mask all 0); generation needs at least one prompt token a row.")
  ids = np.where(mask > 0, ids, pad_token_id)
  # Real tokens to each row's end (stable), then left padding up to the bucket.
  order = np.argsort(mask, axis=-1, kind="stable")
  ids, mask = np.take_along_axis(ids, order, -1), np.take_along_axis(mask, order, -1)
  width = max(1, int(bucket)) * math.ceil(ids.shape[1] / max(1, int(bucket)))
  extra = width - ids.shape[1]
  ids = np.pad(ids, ((0, 0), (extra, 0)), constant_values=pad_token_id).astype(np.int32)
  return ids, np.pad(mask, ((0, 0), (extra, 0))).astype(np.int32)


def generate(backbone, params, prompt_ids, max_new_tokens: int = 64, *,
             key: Optional[jax.Array] = None, temperature: float = 1.0, top_p: float = 1.0,
             top_k: int = 0, eos_token_id: Union[None, int, Sequence[int]] = None,
             attention_mask=None, pad_token_id: Optional[int] = None,
             apply_fn: Optional[Callable] = None, bucket: int = 64,
             spec: Optional[CacheSpec] = None):
  """Generates up to `max_new_tokens` tokens per prompt with a KV cache; greedy without a key.

  Prompts are padded on the left to a multiple of `bucket` tokens, so prompts of one bucket (and
  one batch size and settings) share one compiled program. A row stops after any id of
  `eos_token_id` (default: the config's `eos_token_id`) and is padded with `pad_token_id`
  (default: the config's, else 0) after it.

  Args:
    backbone: a causal-LM `models.Backbone` of a decoder family or GPT-2 (or any object with
      `.config` and `.apply`).
    params: the params apply_fn takes (e.g. `apply_adapters(bb.params, adapters, cfg)`).
    prompt_ids: (B, T) token ids (padded on either side, with `attention_mask`), a list of
      token lists, or one (T,) prompt.
    max_new_tokens: N.
    key: a PRNG key to sample with; None = greedy.
    temperature, top_p, top_k: sampling settings (`filter_logits`); ignored when greedy.
    eos_token_id: an id or several; None = the config's.
    attention_mask: 1 on prompt tokens when prompt_ids is an array.
    pad_token_id: filler after EOS; None = the config's pad_token_id, else 0.
    apply_fn: None = `backbone.apply`; e.g. `evaluate.factored_apply(bb.apply, cfg)` with its
      params (a quantised base with adapters kept factored).
    bucket: prompt length granularity.
    spec: the cache (`cache_spec(backbone)` when None).

  Returns:
    (B, N) int32 NumPy array of new tokens (a (N,) row for one (T,) prompt).

  Example:
    >>> prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}],
    ...                                  add_generation_prompt=True)
    >>> new = models.generate(bb, params, prompt, max_new_tokens=64, key=None)
    >>> tok.decode(new, skip_special_tokens=True)
  """
  if max_new_tokens <= 0:
    raise ConfigError(f"max_new_tokens must be a positive int, got {max_new_tokens}.")
  if key is not None and (not temperature > 0 or not 0 < top_p <= 1 or top_k < 0):
    raise ConfigError(f"sampling needs temperature > 0, 0 < top_p <= 1 and top_k >= 0; got "
                      f"temperature={temperature}, top_p={top_p}, top_k={top_k}.")
  config = backbone.config
  if pad_token_id is None:
    pad_token_id = config.get("pad_token_id")
    pad_token_id = 0 if pad_token_id is None else int(pad_token_id)
  stops = eos_ids(eos_token_id if eos_token_id is not None else config.get("eos_token_id"))
  if isinstance(prompt_ids, (list, tuple)):
    single = bool(prompt_ids) and np.isscalar(prompt_ids[0])
  else:
    single = np.ndim(prompt_ids) == 1
  ids, mask = pad_prompts(prompt_ids, attention_mask, bucket=bucket, pad_token_id=pad_token_id)
  positions = config.get("max_position_embeddings") or config.get("n_positions")
  longest = int(mask.sum(-1).max())
  if positions and longest + max_new_tokens > positions:
    raise ConfigError(f"a prompt of {longest} tokens + max_new_tokens={max_new_tokens} exceeds the "
                      f"model's {positions} positions; shorten the prompt or ask for fewer tokens.")
  sampling = {} if key is None else dict(temperature=float(temperature), top_k=int(top_k),
                                         top_p=float(top_p))
  out = _cached_generate_jit(apply_fn or backbone.apply, spec or cache_spec(backbone), params,
                             ids, mask, key, max_new_tokens=int(max_new_tokens),
                             eos_token_id=stops, pad_token_id=int(pad_token_id), **sampling)
  out = np.asarray(out)
  return out[0] if single else out
