"""LLaMA-shaped benchmark models (random weights), shared by benchmarks/step.py (ours) and
benchmarks/peft_causal_step.py (PEFT): transformers.LlamaConfig keyword arguments per name.

No imports, so the PEFT script loads no JAX and step.py no torch for them.

  llama-tiny     4 layers, hidden 256: a quick smoke shape.
  llama-512      hidden 512, 8 layers, 8 heads / 2 KV heads, FFN 1408, vocab 32000: issue 33
                 item 4's "LLM step on the CPU" (batch 4 x 256, rank 16 on all seven linears).
  llama-smollm2  SmolLM2-135M's shape (tied embeddings, vocab 49152): the LLM job's step without
                 loading the GGUF.
  llama-1b       a 1.1B LLaMA shape (TinyLlama's): for accelerators.
"""

LLAMA_SHAPES = {
    "llama-tiny": dict(vocab_size=32000, hidden_size=256, intermediate_size=688,
                       num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4),
    "llama-512": dict(vocab_size=32000, hidden_size=512, intermediate_size=1408,
                      num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2),
    "llama-smollm2": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                          num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                          max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
                          tie_word_embeddings=True),
    "llama-1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                     num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                     max_position_embeddings=2048),
}

# The seven linears of a LLaMA block: what `--targets all` adapts on both sides.
ALL_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
