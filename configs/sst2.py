r"""SST-2 sentiment (binary) on the real all-MiniLM-L6-v2.

From local TSV files (label<TAB>sentence), e.g. the copy beside the repo:
  python train.py --config configs/sst2.py:method=dora
  python train.py --config configs/sst2.py:method=doran,path=/data/sst2
The same task through tensorflow-datasets, where glue/sst2 is prepared in data_dir:
  python train.py --config configs/sst2.py:method=lora --config.data.source=tfds \
      --config.data.name=glue/sst2 --config.data.data_dir=~/tensorflow_datasets

Learning rate per method (LR, used unless lr= or --config.optim.lr is given): NOT YET TUNED,
every entry is the single lr this config used for all methods (1e-3). To tune, run the grid
  python scripts/lr_sweep.py --config configs/sst2.py --methods lora,dora,doran,dyndora,frozen \
      --lrs 1e-4,3e-4,1e-3,3e-3,1e-2 --seeds 0,1,2
and copy each method's best mean dev accuracy into LR (with the grid and command kept here).
"""

from ml_collections import config_dict

from doran_jax import config_lib, data

# Not yet tuned: run the command in the docstring. 'full' is the lr of the README's full row.
LR = {"lora": 1e-3, "dora": 1e-3, "doran": 1e-3, "dyndora": 1e-3, "frozen": 1e-3, "full": 5e-5}


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
  c.optim.lr = config_dict.placeholder(float)   # unset: LR[method] (config_lib.resolved)
  c.optim.lr_by_method = LR
  c.optim.warmup_steps = 40
  c.checkpoint.every = 200
  c.baselines = ("majority", "linear_probe")
  return config_lib.apply_arg(c, arg)
