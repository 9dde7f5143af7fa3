"""GPT-2: the decoder family with fused query/key/value (c_attn)."""

from __future__ import annotations

from doran_jax.models.registry import Family, register


def tiny_gpt2(**overrides):
  import transformers
  return transformers.GPT2Config(**{**dict(vocab_size=128, n_positions=64, n_embd=32, n_layer=2,
                                           n_head=4), **overrides})


GPT2 = register(Family(
    name="gpt2", model_types=("gpt2",), tasks=("causal_lm", "classification", "features"),
    heads={"classification": r"score/.*"},
    target_presets={"attention": r".*/c_attn/kernel",
                    "all_linear": r".*/h/.*/(c_attn|c_proj|c_fc)/kernel"},
    column_parallel=r"c_attn|c_fc", row_parallel=r"attn/c_proj|mlp/c_proj",
    input_keys={t: ("input_ids", "attention_mask") for t in ("causal_lm", "classification",
                                                             "features")},
    tiny_config=tiny_gpt2))
