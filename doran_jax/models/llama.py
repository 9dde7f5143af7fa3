"""The LLaMA family: Llama 1-3 and the decoders that share its architecture."""

from __future__ import annotations

from doran_jax.models.registry import Family, register


def tiny_llama(**overrides):
  import transformers
  return transformers.LlamaConfig(**{**dict(vocab_size=128, hidden_size=32, intermediate_size=48,
                                            num_hidden_layers=2, num_attention_heads=4,
                                            num_key_value_heads=2, max_position_embeddings=64),
                                     **overrides})


LLAMA = register(Family(
    name="llama", model_types=("llama",), tasks=("causal_lm", "classification", "features"),
    heads={"classification": r"score/.*"},
    target_presets={"attention": r".*/(q_proj|v_proj)/kernel",
                    "all_linear": r".*/layers/.*/(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|"
                                  r"down_proj)/kernel"},
    column_parallel=r"q_proj|k_proj|v_proj|gate_proj|up_proj", row_parallel=r"o_proj|down_proj",
    input_keys={t: ("input_ids", "attention_mask") for t in ("causal_lm", "classification",
                                                             "features")},
    tiny_config=tiny_llama))
