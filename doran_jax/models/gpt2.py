"""GPT-2: the decoder family with fused query/key/value (c_attn); modules in modeling/gpt2.py."""

from __future__ import annotations

from doran_jax.models.modeling import gpt2 as modeling
from doran_jax.models.registry import Family, register


def tiny_gpt2(**overrides):
  import transformers  # configs only: no model class is used
  return transformers.GPT2Config(**{**dict(vocab_size=128, n_positions=64, n_embd=32, n_layer=2,
                                           n_head=4), **overrides})


GPT2 = register(Family(
    name="gpt2", model_types=("gpt2",), tasks=modeling.TASKS,
    heads={"classification": r"score/.*"},
    target_presets={"attention": r".*/c_attn/kernel",
                    "all_linear": r".*/h/.*/(c_attn|c_proj|c_fc)/kernel"},
    column_parallel=r"c_attn|c_fc", row_parallel=r"attn/c_proj|mlp/c_proj",
    # GPT-2 adds wte(token_type_ids) when given them, so they are never passed.
    # segment_ids: packed rows; cache/cache_index: KV-cached decoding (models.generate).
    input_keys={"causal_lm": ("input_ids", "attention_mask", "position_ids", "segment_ids",
                              "cache", "cache_index", "logit_positions"),
                "classification": ("input_ids", "attention_mask"),
                "features": ("input_ids", "attention_mask")},
    tiny_config=tiny_gpt2, build=modeling.build, prefix=modeling.prefix,
    cache_shape=modeling.cache_shape,
    # GPT-2 names its learned position table's size n_positions.
    max_positions=lambda cfg: cfg.get("n_positions", 1024), learned_positions=True,
    tied_params=modeling.tied_params, no_transpose=modeling.NO_TRANSPOSE,
    renames=modeling.RENAMES))
