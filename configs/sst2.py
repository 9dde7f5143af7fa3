r"""SST-2 sentiment (binary) on the real all-MiniLM-L6-v2.

From local TSV files (label<TAB>sentence), e.g. the copy beside the repo:
  python train.py --config configs/sst2.py:method=dora
  python train.py --config configs/sst2.py:method=doran,path=/data/sst2
The same task through tensorflow-datasets, where glue/sst2 is prepared in data_dir:
  python train.py --config configs/sst2.py:method=lora --config.data.source=tfds \
      --config.data.name=glue/sst2 --config.data.data_dir=~/tensorflow_datasets
"""

from doran_jax import config_lib, data


def get_config(arg=None):
  c = config_lib.base_config()
  c.workdir = "runs/sst2"
  c.model.name = "minilm"
  c.adapter = config_lib.adapter_defaults(method="dora", rank=8, alpha=16.0,
                                          targets=r".*/(query|key|value|dense)/kernel")
  c.data = data.default_data_config("tsv", path="../shared/data/text/sst2", format="sst2",
                                    text_keys=("sentence",), max_length=64)
  c.batch_size = 32
  c.num_epochs = 2.0
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 40
  c.checkpoint.every = 200
  c.baselines = ("majority",)
  return config_lib.apply_arg(c, arg)
