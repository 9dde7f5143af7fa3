r"""CoLA linguistic acceptability on the real all-MiniLM-L6-v2 (reports Matthews correlation).

From local TSV files (sentence<TAB>label):
  python train.py --config configs/cola.py:method=dora
  python train.py --config configs/cola.py:method=dyndora,rank=8
Through tensorflow-datasets, where glue/cola is prepared in data_dir:
  python train.py --config configs/cola.py --config.data.source=tfds --config.data.name=glue/cola \
      --config.data.data_dir=~/tensorflow_datasets

Targets: every linear layer of each block (the family's 'all_linear' preset: query, key, value,
attention output, intermediate, output), as the official DynDoRA code adapts them; the pooler is
not adapted. method=dyndora also takes the official recipe (alpha 8, dropout 0.1, weight decay
0.01, 6% warm-up, clip 1.0; doran_jax/adapters/dyndora.py RECIPE) unless given explicitly.

Learning rate per method (LR, used unless lr= or --config.optim.lr is given): NOT YET TUNED,
every entry is the single lr this config used for all methods (1e-3). To tune, run the grid
  python scripts/lr_sweep.py --config configs/cola.py --methods lora,dora,doran,dyndora,frozen \
      --lrs 1e-4,3e-4,1e-3,3e-3 --seeds 0,1,2
and copy each method's best mean dev MCC into LR (with the grid and command kept here).
"""

from ml_collections import config_dict

from doran_jax import config_lib, data

# Not yet tuned: run the command in the docstring. No 'full' entry: pass lr= for it.
LR = {"lora": 1e-3, "dora": 1e-3, "doran": 1e-3, "dyndora": 1e-3, "frozen": 1e-3}


def get_config(arg=None):
  c = config_lib.base_config()
  c.workdir = "runs/cola"
  c.model.name = "minilm"
  c.adapter = config_lib.adapter_defaults(method="dora", rank=8, alpha=16.0,
                                          targets="all_linear")
  c.data = data.default_data_config("tsv", path="../shared/data/text/cola", format="cola",
                                    text_keys=("sentence",), max_length=48)
  c.batch_size = 32
  c.num_epochs = 4.0
  c.optim.lr = config_dict.placeholder(float)   # unset: LR[method] (config_lib.resolved)
  c.optim.lr_by_method = LR
  c.optim.warmup_steps = 60
  c.checkpoint.every = 200
  # Trained in full with the head: the pooler (dense + tanh on [CLS]). It is BERT's counterpart
  # of the dense layer of RoBERTa's classification head, which the official DynDoRA code (and
  # PEFT's SEQ_CLS task) trains in full. Frozen, it starved every method: LoRA at lr 1e-3 for 2
  # epochs predicted the majority class (dev MCC 0.000, 2026-12-02); all-MiniLM-L6-v2 was
  # trained for mean pooling, so its pooler was never tuned for this.
  c.head = r"(classifier|bert/pooler)/.*"
  c.baselines = ("majority", "linear_probe")
  return config_lib.apply_arg(c, arg)
