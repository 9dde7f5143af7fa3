"""BERT (incl. all-MiniLM-L6-v2) and RoBERTa: encoder families (modules in modeling/bert.py)."""

from __future__ import annotations

from doran_jax.models.modeling import bert as modeling
from doran_jax.models.registry import Family, register

_TEXT_INPUTS = {"classification": ("input_ids", "attention_mask", "token_type_ids"),
                "features": ("input_ids", "attention_mask", "token_type_ids")}
_PRESETS = {"attention": r".*/(query|value)/kernel",
            "all_linear": r".*/encoder/.*/(query|key|value|dense)/kernel"}
_COMMON = dict(
    tasks=modeling.TASKS, heads={"classification": r"classifier/.*"}, target_presets=_PRESETS,
    column_parallel=r"query|key|value|intermediate/dense",
    row_parallel=r"attention/output/dense|output/dense", input_keys=_TEXT_INPUTS,
    build=modeling.build, prefix=modeling.prefix, tied_params=modeling.tied_params,
    no_transpose=modeling.NO_TRANSPOSE, renames=modeling.RENAMES, learned_positions=True)


def tiny_bert(**overrides):
  import transformers  # configs only: no model class is used
  return transformers.BertConfig(**{**dict(vocab_size=128, hidden_size=32, num_hidden_layers=2,
                                           num_attention_heads=4, intermediate_size=48,
                                           max_position_embeddings=64), **overrides})


def tiny_roberta(**overrides):
  import transformers
  return transformers.RobertaConfig(**{**dict(vocab_size=128, hidden_size=32, num_hidden_layers=2,
                                              num_attention_heads=4, intermediate_size=48,
                                              max_position_embeddings=66, pad_token_id=1),
                                       **overrides})


BERT = register(Family(
    name="bert", model_types=("bert",), tiny_config=tiny_bert,
    max_positions=lambda cfg: cfg.get("max_position_embeddings", 512), **_COMMON))
# RoBERTa's positions start after the pad id (roberta_position_ids): 514 rows hold 512 tokens.
ROBERTA = register(Family(
    name="roberta", model_types=("roberta",), tiny_config=tiny_roberta,
    max_positions=lambda cfg: (cfg.get("max_position_embeddings", 514)
                               - cfg.get("pad_token_id", 1) - 1),
    **_COMMON))
