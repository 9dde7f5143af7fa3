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

Learning rate per method (LR, used unless lr= or --config.optim.lr is given). lora and dyndora
are tuned by the DynDoRA study (docs/results/study_dyndora_cola.md, 2026-12-02), at its scale:
2 epochs at batch 16, max_length 32, mean dev MCC over seeds 0-4 at 1e-3 (0-2 elsewhere):
  python scripts/study_dyndora_cola.py                                  # lrs 1e-3, 3e-3
  python scripts/study_dyndora_cola.py --lrs 3e-4 --seeds 0 --resume    # the lower point
  python scripts/study_dyndora_cola.py --lrs 1e-3 --seeds 3,4 --resume  # 5 seeds at the best
  lora     3e-4: 0.131 (seed 0)   1e-3: 0.148 ± 0.047   3e-3: 0.000 (seed 0, majority class)
  dyndora  3e-4: 0.000 (seed 0)    1e-3: 0.134 ± 0.038   3e-3: 0.081 (seed 0)
dora, doran and frozen are NOT YET TUNED (1e-3, the single lr every method used before); the
grid that tunes them is
  python scripts/lr_sweep.py --config configs/cola.py --metric mcc --methods dora,doran,frozen \
      --lrs 3e-4,1e-3,3e-3 --seeds 0,1,2 --epochs 2 --batch 16 --max-length 32
The tuned frozen-backbone baseline is the linear probe (config.baselines: a logistic regression
on frozen mean-pooled features, fitted to convergence, no lr).
"""

from ml_collections import config_dict

from doran_jax import config_lib, data

# lora, dyndora: tuned (docstring); dora, doran, frozen: not yet. No 'full' entry: pass lr=.
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
