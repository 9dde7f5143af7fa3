r"""LLaMA-7B instruction tuning on the commonsense-reasoning suite (the DoRA paper's recipe).

  python train.py --config configs/llama_commonsense.py:method=dora \
      --config.model.name=/ckpt/llama-7b-flax --config.data.path=../shared/data/commonsense
  python train.py --config configs/llama_commonsense.py:method=doran \
      --config.data.train_file=/data/commonsense_170k.json

Recipe (DoRA, Liu et al. 2024, Table 9): rank 32, alpha 64, lora_dropout 0.05, AdamW, lr 1e-4
(2e-4 for DoRA's half-rank setting), 100 warmup steps, linear decay, batch 16, 3 epochs, cutoff 256,
targets q, k, v, up, down. Loss on the answer tokens only. Evaluation extracts the answer word from
the greedy generation (doran_jax.commonsense).
Deviations: the training set defaults to the union of the train.json files kept in
../shared/data/commonsense (the 170k combined file is too large to ship; pass it with
data.train_file); bf16 compute with float32 adapters, backbone stored in bf16; remat on; on CPU
use the tiny override (`--config.model.tiny=llama --config.model.tokenizer=minilm`) for a smoke run.
"""

from doran_jax import config_lib, data


def get_config(arg=None):
  c = config_lib.base_config()
  c.workdir = "runs/llama_commonsense"
  c.model.name = "huggyllama/llama-7b"
  c.model.task = "causal_lm"
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "bfloat16"
  c.model.remat = True
  c.adapter = config_lib.adapter_defaults(
      method="dora", rank=32, alpha=64.0, dropout=0.05, mode="factored",
      targets=r".*/(q_proj|k_proj|v_proj|up_proj|down_proj)/kernel")
  c.data = data.default_data_config("commonsense", path="../shared/data/commonsense", max_length=256)
  c.batch_size = 16
  c.eval_batch_size = 16
  c.num_epochs = 3.0
  c.optim.lr = 1e-4
  c.optim.warmup_steps = 100
  c.optim.schedule = "linear"
  c.optim.clip_norm = 0.0
  c.checkpoint.every = 500
  c.mesh = "data:-1,fsdp:1,model:1"
  c.sharding_rules = "fsdp"
  c.generate.update(dict(enabled=True, max_new_tokens=32, limit_per_task=0))
  return config_lib.apply_arg(c, arg)
