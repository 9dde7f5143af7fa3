"""BERT (incl. all-MiniLM-L6-v2) and RoBERTa: encoder families."""

from __future__ import annotations

from doran_jax.models.registry import Family, register

_TEXT_INPUTS = {"classification": ("input_ids", "attention_mask", "token_type_ids"),
                "features": ("input_ids", "attention_mask", "token_type_ids")}
_PRESETS = {"attention": r".*/(query|value)/kernel",
            "all_linear": r".*/encoder/.*/(query|key|value|dense)/kernel"}


def tiny_bert(**overrides):
  import transformers
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
    name="bert", model_types=("bert",), tasks=("classification", "features"),
    heads={"classification": r"classifier/.*"}, target_presets=_PRESETS,
    column_parallel=r"query|key|value|intermediate/dense",
    row_parallel=r"attention/output/dense|output/dense",
    input_keys=_TEXT_INPUTS, tiny_config=tiny_bert,
    fused_classes=(("FlaxBertSelfAttention",), ("FlaxBertIntermediate",))))

ROBERTA = register(Family(
    name="roberta", model_types=("roberta",), tasks=("classification", "features"),
    heads={"classification": r"classifier/.*"}, target_presets=_PRESETS,
    column_parallel=r"query|key|value|intermediate/dense",
    row_parallel=r"attention/output/dense|output/dense",
    input_keys=_TEXT_INPUTS, tiny_config=tiny_roberta,
    fused_classes=(("FlaxRobertaSelfAttention",), ("FlaxRobertaIntermediate",))))
