"""Log-likelihood scoring of causal LMs: multiple-choice accuracy as lm-evaluation-harness scores
ARC, PIQA and BoolQ.

A request is (context, continuation). Its score is the summed log-probability of the
continuation's tokens given the context; `is_greedy` says whether every continuation token is
also the model's argmax. A multiple-choice question is one request per choice: `accuracy` picks
the choice with the highest log-likelihood, `accuracy_norm` the highest log-likelihood per
character of the continuation (the harness's `acc_norm`, which divides by the string's length,
not by its tokens).

Tokenisation follows the harness (`TemplateLM._encode_pair`): trailing spaces move from the context
onto the continuation, context + continuation is tokenised as a whole and split at the length of
the context's own tokens, so a token merged across the boundary counts for the continuation. Like
training (`commonsense.encode`), a sequence starts with BOS when the tokenizer has one.

Example:
  >>> ll_fn = make_loglikelihood_fn(bb.apply, params, pad_id=tok.pad_token_id)
  >>> lls, greedy = ll_fn([encode_pair(tok, "Q: 2+2?\\nA:", " 4"), encode_pair(tok, "Q: 2+2?\\nA:", " 5")])
  >>> multiple_choice(ll_fn, tok, commonsense_questions(records))["accuracy"]
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from doran_jax import commonsense
from doran_jax.errors import ConfigError, DataError

# LLM-Adapters' commonsense records end their instruction with "Answer format: a/b/c"; the
# answer words are its choices (ARC rows have 3 to 5).
_ANSWER_FORMAT = re.compile(r"Answer format:\s*([^\n]+?)\s*$")
# The completion the commonsense training data teaches ("the correct answer is X").
COMMONSENSE_STEM = "the correct answer is "


@dataclasses.dataclass(frozen=True)
class Question:
  """One multiple-choice question: a shared context, one continuation per choice, the gold index."""

  context: str
  continuations: tuple[str, ...]
  gold: int
  task: str = ""


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
  """(context ids, continuation ids): BOS + context, and the rest of the whole string's tokens.

  Example:
    >>> ctx, cont = encode_pair(tok, "The sky is", " blue")
  """
  stripped = context.rstrip(" ")
  continuation = context[len(stripped):] + continuation
  whole = commonsense.encode(tokenizer, stripped + continuation)
  ctx = commonsense.encode(tokenizer, stripped)
  if not continuation or len(whole) <= len(ctx):
    raise DataError(f"continuation {continuation!r} adds no token to context "
                    f"{stripped[-60:]!r}; every choice needs at least one token.")
  return whole[:len(ctx)], whole[len(ctx):]


def make_loglikelihood_fn(apply_fn: Callable, params, *, pad_id: int = 0,
                          max_length: Optional[int] = None, batch_size: int = 8,
                          bucket: int = 64, cache=None) -> Callable:
  """(pairs of (ctx ids, cont ids)) -> (log-likelihoods float64 (N,), is_greedy bool (N,)).

  Without `cache`, each pair is one sequence: rows are sorted by length, right padded to a
  multiple of `bucket` and run `batch_size` at a time through one jitted forward (one compile per
  padded length). With `cache` (the model's `models.generate.CacheSpec`), pairs that share their
  context ids (a question's choices) share one forward of the context: it is run once into a KV
  cache, and each continuation is then run against that cache alone, so a question with k
  choices costs about one forward of its context instead of k. Both give the same numbers (up
  to float rounding). A sequence longer than `max_length` loses context tokens from the left,
  as the harness truncates.

  Args:
    apply_fn: (params, batch) -> logits (B, T, V) in eval mode (`Backbone.apply`, or the
      factored apply from `evaluate.params_and_apply`); with `cache` it must also take the
      cache batch keys (`models.generate.cached_generate` says which).
    params: what apply_fn takes.
    pad_id: the id written into padding (masked out).
    max_length: longest sequence fed to the model (its positions); None = no limit.
    cache: `models.generate.cache_spec(backbone)` to share contexts, or None.

  Example:
    >>> ll_fn = make_loglikelihood_fn(bb.apply, params, pad_id=0, max_length=2048,
    ...                               cache=models.generate.cache_spec(bb))
    >>> lls, greedy = ll_fn([([1, 5, 9], [7]), ([1, 5, 9], [8, 2])])
  """
  if batch_size <= 0 or bucket <= 0:
    raise ConfigError(f"batch_size ({batch_size}) and bucket ({bucket}) must be positive.")

  def token_scores(logits_BxTxV, next_BxT, on_BxT):
    logp_BxTxV = jax.nn.log_softmax(logits_BxTxV.astype(jnp.float32), axis=-1)
    lp_BxT = jnp.take_along_axis(logp_BxTxV, next_BxT[..., None], axis=-1)[..., 0]
    ll_B = jnp.sum(jnp.where(on_BxT, lp_BxT, 0.0), axis=-1)
    greedy_B = jnp.all(~on_BxT | (jnp.argmax(logp_BxTxV, -1) == next_BxT), axis=-1)
    return ll_B, greedy_B

  @jax.jit
  def score(p, ids_BxT, mask_BxT, target_BxT):
    logits_BxTxV = apply_fn(p, {"input_ids": ids_BxT, "attention_mask": mask_BxT})
    return token_scores(logits_BxTxV[:, :-1], ids_BxT[:, 1:], target_BxT[:, 1:])

  @jax.jit
  def score_shared(p, ctx_BxP, ctx_mask_BxP, cont_KxBxC, cont_mask_KxBxC):
    b, n_ctx = ctx_BxP.shape
    c = cont_KxBxC.shape[-1]
    lengths_B = ctx_mask_BxP.sum(-1)
    keys_BxS = jnp.concatenate([ctx_mask_BxP, jnp.zeros((b, c), ctx_mask_BxP.dtype)], 1)
    ctx_logits, cache_filled = apply_fn(p, {
        "input_ids": ctx_BxP, "attention_mask": keys_BxS,
        "position_ids": jnp.maximum(jnp.cumsum(ctx_mask_BxP, -1) - 1, 0),
        "cache": cache.init(b, n_ctx + c), "cache_index": jnp.int32(0),
        "logit_positions": jnp.full((b, 1), n_ctx - 1, jnp.int32)})   # the LM head there only
    last_Bx1xV = ctx_logits[:, -1:]   # (B, 1, V), or (B, P, V) from a model without positions

    def one_choice(xs):
      cont_BxC, cont_mask_BxC = xs
      logits_BxCxV, _ = apply_fn(p, {
          "input_ids": cont_BxC,
          "attention_mask": jnp.concatenate([ctx_mask_BxP, cont_mask_BxC], 1),
          "position_ids": lengths_B[:, None] + jnp.arange(c, dtype=jnp.int32)[None],
          "cache": cache_filled, "cache_index": jnp.int32(n_ctx)})
      # Token 0 is predicted by the context's last position, token i by continuation token i-1.
      logits_BxCxV = jnp.concatenate([last_Bx1xV, logits_BxCxV[:, :-1]], 1)
      return token_scores(logits_BxCxV, cont_BxC, cont_mask_BxC > 0)

    return jax.lax.map(one_choice, (cont_KxBxC, cont_mask_KxBxC))

  def fitted(pairs):
    out = []
    for ctx, cont in pairs:
      ctx, cont = list(ctx), list(cont)
      if not cont:
        raise DataError("a continuation needs at least one token.")
      if max_length is not None and len(ctx) + len(cont) > max_length:
        if len(cont) >= max_length:
          raise DataError(f"a continuation of {len(cont)} tokens does not fit max_length "
                          f"{max_length}.")
        ctx = ctx[len(ctx) + len(cont) - max_length:]
      out.append((ctx, cont))
    return out

  def one_per_row(pairs, lls, greedy):
    seqs = [(ctx + cont, len(cont)) for ctx, cont in pairs]
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i][0]))
    for start in range(0, len(order), batch_size):
      rows = order[start:start + batch_size]
      longest = len(seqs[rows[0]][0])
      length = math.ceil(longest / bucket) * bucket
      if max_length is not None:
        length = min(length, max(max_length, longest))
      ids = np.full((batch_size, length), pad_id, np.int32)
      mask = np.zeros((batch_size, length), np.int32)
      target = np.zeros((batch_size, length), bool)
      for j, i in enumerate(rows):
        seq, n_cont = seqs[i]
        ids[j, :len(seq)] = seq
        mask[j, :len(seq)] = 1
        target[j, len(seq) - n_cont:len(seq)] = True
      # Unused rows keep one real token so no softmax row is all masked; their scores are dropped.
      mask[len(rows):, 0] = 1
      ll_B, greedy_B = jax.device_get(score(params, ids, mask, target))
      lls[rows] = ll_B[:len(rows)]
      greedy[rows] = greedy_B[:len(rows)]

  def shared_context(pairs, lls, greedy):
    groups = collections.defaultdict(list)   # context ids -> indices of its pairs
    for i, (ctx, _) in enumerate(pairs):
      groups[tuple(ctx)].append(i)
    contexts = sorted(groups, key=len, reverse=True)
    for start in range(0, len(contexts), batch_size):
      chunk = contexts[start:start + batch_size]
      n_ctx = math.ceil(len(chunk[0]) / bucket) * bucket
      k = max(len(groups[ctx]) for ctx in chunk)
      longest = max(len(pairs[i][1]) for ctx in chunk for i in groups[ctx])
      c = 8 * math.ceil(longest / 8)
      ctx_ids = np.full((batch_size, n_ctx), pad_id, np.int32)
      ctx_mask = np.zeros((batch_size, n_ctx), np.int32)
      cont_ids = np.full((k, batch_size, c), pad_id, np.int32)
      cont_mask = np.zeros((k, batch_size, c), np.int32)
      ctx_mask[len(chunk):, -1] = 1   # unused rows: one real key, scores dropped
      for b, ctx in enumerate(chunk):
        ctx_ids[b, n_ctx - len(ctx):] = ctx          # left padded: one cache slot for the batch
        ctx_mask[b, n_ctx - len(ctx):] = 1
        for j, i in enumerate(groups[ctx]):
          cont = pairs[i][1]
          cont_ids[j, b, :len(cont)] = cont
          cont_mask[j, b, :len(cont)] = 1
      ll_KxB, greedy_KxB = jax.device_get(score_shared(params, ctx_ids, ctx_mask, cont_ids,
                                                       cont_mask))
      for b, ctx in enumerate(chunk):
        for j, i in enumerate(groups[ctx]):
          lls[i], greedy[i] = ll_KxB[j, b], greedy_KxB[j, b]

  def loglikelihood(pairs: Sequence[tuple[Sequence[int], Sequence[int]]]):
    pairs = fitted(pairs)
    lls = np.zeros(len(pairs), np.float64)
    greedy = np.zeros(len(pairs), bool)
    (one_per_row if cache is None else shared_context)(pairs, lls, greedy)
    return lls, greedy

  return loglikelihood


def commonsense_choices(record: dict) -> list[str]:
  """The answer words a commonsense record offers ('Answer format: answer1/answer2/answer3'), else
  every answer word of its task.

  Example:
    >>> commonsense_choices({"instruction": "...\\n\\nAnswer format: true/false", "task": "boolq"})
    ['true', 'false']
  """
  found = _ANSWER_FORMAT.search(record["instruction"].strip())
  if found:
    choices = [c.strip() for c in found.group(1).split("/") if c.strip()]
  else:
    choices = commonsense.ANSWER_PATTERNS[record["task"]].split("|")
  if record["answer"] not in choices:
    raise DataError(f"the answer {record['answer']!r} is not among the record's choices {choices} "
                    f"(task {record.get('task')!r}): {record['instruction'][-120:]!r}.")
  return choices


def commonsense_questions(records: Sequence[dict], prompt_fn: Optional[Callable[[dict], str]] = None
                          ) -> list[Question]:
  """One Question per commonsense record: the training prompt as context and
  'the correct answer is X' for each choice X, the completion its training data teaches.

  `prompt_fn(record) -> str` builds the context (default: the Alpaca prompt the suite trains on).

  Example:
    >>> qs = commonsense_questions(commonsense.load_records(".../boolq/test.json", "boolq"))
    >>> qs[0].continuations
    ('the correct answer is true', 'the correct answer is false')
  """
  prompt_fn = prompt_fn or (lambda r: commonsense.generate_prompt(r["instruction"], r.get("input", "")))
  out = []
  for record in records:
    choices = commonsense_choices(record)
    out.append(Question(prompt_fn(record), tuple(COMMONSENSE_STEM + c for c in choices),
                        choices.index(record["answer"]), record.get("task") or ""))
  return out


def multiple_choice(ll_fn: Callable, tokenizer, questions: Sequence[Question], *,
                    return_outputs: bool = False) -> dict:
  """accuracy, accuracy_norm (per character), n and per-task results of `questions`.

  With `return_outputs`, also 'outputs': per question (in order) its task, gold index, the
  chosen index by log-likelihood ('choice') and per character ('choice_norm') and the
  continuations' log-likelihoods: what paired tests between two runs (McNemar) need.

  Example:
    >>> multiple_choice(make_loglikelihood_fn(bb.apply, params), tok, questions)
    {'accuracy': 0.61, 'accuracy_norm': 0.6, 'n': 300, 'per_task': {...}}
  """
  if not questions:
    raise DataError("multiple_choice needs at least one question.")
  pairs = []
  for q, question in enumerate(questions):
    if len(question.continuations) < 2 or not 0 <= question.gold < len(question.continuations):
      raise DataError(f"question {q} needs at least two continuations and a gold index among "
                      f"them; got {len(question.continuations)} and gold {question.gold}.")
    for continuation in question.continuations:
      pairs.append(encode_pair(tokenizer, question.context, continuation))
  lls, _ = ll_fn(pairs)
  counts = collections.defaultdict(lambda: np.zeros(3))   # task -> [correct, correct_norm, n]
  outputs = []
  start = 0
  for question in questions:
    k = len(question.continuations)
    ll_K = lls[start:start + k]
    chars_K = np.array([len(c) for c in question.continuations], np.float64)
    start += k
    choice, choice_norm = int(np.argmax(ll_K)), int(np.argmax(ll_K / chars_K))
    counts[question.task] += (int(choice == question.gold), int(choice_norm == question.gold), 1)
    if return_outputs:
      outputs.append({"task": question.task, "gold": question.gold, "choice": choice,
                      "choice_norm": choice_norm,
                      "loglikelihoods": [float(x) for x in ll_K]})
  total = sum(counts.values())
  per_task = {t: {"accuracy": c / n, "accuracy_norm": cn / n, "n": int(n)}
              for t, (c, cn, n) in sorted(counts.items())}
  result = {"accuracy": total[0] / total[2], "accuracy_norm": total[1] / total[2],
            "n": int(total[2]), "per_task": per_task}
  if return_outputs:
    result["outputs"] = outputs
  return result
