r"""Tiny random backbones for smoke runs and tests (seconds on a CPU): the real code paths, small sizes.

  python train.py --config configs/tiny.py:kind=text,method=doran
  python train.py --config configs/tiny.py:kind=causal,method=dora
  python train.py --config configs/tiny.py:kind=image --config.data.data_dir=~/tensorflow_datasets

kind=text: tiny BERT on 64 SST-2 sentences from ../shared/data/text/sst2 (MiniLM's tokenizer);
kind=image: tiny ViT on tfds cifar100 (16 px); kind=causal: tiny LLaMA on the commonsense files.
"""

from doran_jax import config_lib, data


def get_config(arg=None):
  c = config_lib.base_config()
  c.kind = "text"
  c.workdir = "runs/tiny"
  c.adapter = config_lib.adapter_defaults(method="doran", rank=4, alpha=8.0,
                                          targets=r".*/(query|value)/kernel")
  c.model.tokenizer = "minilm"
  c.model.config_overrides = {"vocab_size": 30522}  # MiniLM's tokenizer
  c.batch_size = 8
  c.eval_batch_size = 16
  c.num_steps = 4
  c.log_every = 1
  c.optim.warmup_steps = 1
  c.checkpoint.every = 2
  c.data = data.default_data_config("tsv", path="../shared/data/text/sst2", format="sst2",
                                    max_length=16, limit=64, eval_limit=32)
  # Smoke sizes, not recipes: keep the file's targets and alpha (method_recipe=True to test one).
  c.method_recipe = False
  config_lib.apply_arg(c, arg, aliases={"kind": "kind"})
  with c.unlocked():
    if c.kind == "text":
      c.model.tiny, c.model.task = "bert", "classification"
    elif c.kind == "image":
      c.model.tiny, c.model.task = "vit", "image_classification"
      c.data = data.default_data_config("tfds_image", name="cifar100", image_size=16, limit=64,
                                        eval_limit=32)
    elif c.kind == "causal":
      c.model.tiny, c.model.task = "llama", "causal_lm"
      c.adapter.targets = r".*/(q_proj|v_proj)/kernel"
      c.data = data.default_data_config("commonsense", path="../shared/data/commonsense",
                                        max_length=64, limit=64, eval_limit=16, task="boolq")
      c.generate.update(dict(enabled=True, max_new_tokens=4, limit_per_task=8))
    else:
      raise ValueError(f"unknown kind {c.kind!r}; choose text, image or causal.")
  return c
