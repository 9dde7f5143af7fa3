r"""CoLA linguistic acceptability on the real all-MiniLM-L6-v2 (reports Matthews correlation).

From local TSV files (sentence<TAB>label):
  python train.py --config configs/cola.py:method=dora
  python train.py --config configs/cola.py:method=dyndora,rank=8
Through tensorflow-datasets, where glue/cola is prepared in data_dir:
  python train.py --config configs/cola.py --config.data.source=tfds --config.data.name=glue/cola \
      --config.data.data_dir=~/tensorflow_datasets
"""

from doran_jax import config_lib, data


def get_config(arg=None):
  c = config_lib.base_config()
  c.workdir = "runs/cola"
  c.model.name = "minilm"
  c.adapter = config_lib.adapter_defaults(method="dora", rank=8, alpha=16.0,
                                          targets=r".*/(query|key|value|dense)/kernel")
  c.data = data.default_data_config("tsv", path="../shared/data/text/cola", format="cola",
                                    text_keys=("sentence",), max_length=48)
  c.batch_size = 32
  c.num_epochs = 4.0
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 60
  c.checkpoint.every = 200
  c.baselines = ("majority",)
  return config_lib.apply_arg(c, arg)
