"""The LLaMA family: Llama 1-3, Mistral, Qwen2, Qwen3 and Gemma 3 (text) share one decoder
(modeling/decoder.py) with per-family switches; one record per model type."""

from __future__ import annotations

from doran_jax.models.modeling import decoder as modeling
from doran_jax.models.registry import Family, register

_SMALL = dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def _tiny(class_name: str, **defaults):
  def make(**overrides):
    import transformers  # configs only: no model class is used
    return getattr(transformers, class_name)(**{**_SMALL, **defaults, **overrides})
  return make


def _build(cfg, task, *, dtype, num_labels=None, remat=False, memory_lean=True):
  return modeling.build(cfg, task, dtype=dtype, num_labels=num_labels, memory_lean=memory_lean,
                        remat=remat)


def _record(name: str, model_type: str, tiny) -> Family:
  return register(Family(
      name=name, model_types=(model_type,), tasks=modeling.TASKS,
      heads={"classification": r"score/.*"},
      target_presets={"attention": r".*/(q_proj|v_proj)/kernel",
                      "all_linear": r".*/layers/.*/(q_proj|k_proj|v_proj|o_proj|gate_proj|"
                                    r"up_proj|down_proj)/kernel"},
      column_parallel=r"q_proj|k_proj|v_proj|gate_proj|up_proj", row_parallel=r"o_proj|down_proj",
      # position_ids: generation's padded slots keep the true positions (dynamic rope), packed
      # rows restart them per segment; cache/cache_index: KV-cached decoding (models.generate);
      # logit_positions: the LM head only where a target follows (data.causal.target_positions).
      input_keys={"causal_lm": ("input_ids", "attention_mask", "position_ids", "segment_ids",
                                "cache", "cache_index", "logit_positions"),
                  "classification": ("input_ids", "attention_mask"),
                  "features": ("input_ids", "attention_mask")},
      tiny_config=tiny, build=_build, prefix=lambda cfg: "model", cache_shape=modeling.cache_shape,
      tied_params=modeling.tied_params,
      # Rotary positions: longer inputs run, past the context the model was trained on.
      max_positions=lambda cfg: cfg.get("max_position_embeddings")))


LLAMA = _record("llama", "llama", _tiny("LlamaConfig"))
MISTRAL = _record("mistral", "mistral", _tiny("MistralConfig", sliding_window=16))
QWEN2 = _record("qwen2", "qwen2", _tiny("Qwen2Config", tie_word_embeddings=True))
QWEN3 = _record("qwen3", "qwen3", _tiny("Qwen3Config", head_dim=16))
GEMMA3 = _record("gemma3", "gemma3_text", _tiny("Gemma3TextConfig", head_dim=16))
