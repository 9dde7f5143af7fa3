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

Learning rate per method (LR, used unless lr= or --config.optim.lr is given), all at the scale
of the studies: 2 epochs at batch 16 (1,069 steps), max_length 32, dev MCC (516 sentences).
lora and dyndora from the DynDoRA study (docs/results/study_dyndora_cola.md, 2026-12-02/03;
mean over seeds 0-4 at 1e-3, seed 0 elsewhere):
  python scripts/study_dyndora_cola.py                                  # lrs 1e-3, 3e-3
  python scripts/study_dyndora_cola.py --lrs 3e-4 --seeds 0 --resume    # the lower point
  python scripts/study_dyndora_cola.py --lrs 1e-3 --seeds 3,4 --resume  # 5 seeds at the best
  lora     3e-4: 0.131 (seed 0)   1e-3: 0.148 ± 0.047   3e-3: 0.000 (seed 0, majority class)
  dyndora  3e-4: 0.000 (seed 0)    1e-3: 0.134 ± 0.038   3e-3: 0.081 (seed 0)
dora and doran from the DoRAN ablation (docs/results/study_doran_ablation_cola.md, 2026-12-03;
mean over seeds 0-2 at 3e-4 and at doran's 1e-4, seed 0 elsewhere), which also re-ran lora on today's code:
  python scripts/study_doran_ablation.py --tasks cola --epochs 2 --eval-limit 0 \
      --variants lora,dora --lrs 3e-4,1e-3 --seeds 0
  python scripts/study_doran_ablation.py --tasks cola --epochs 2 --eval-limit 0 \
      --variants lora,dora,doran_model --lrs 3e-4 --seeds 0,1,2 --resume
  python scripts/study_doran_ablation.py --tasks cola --epochs 2 --eval-limit 0 \
      --variants doran_model --lrs 1e-4,1e-3 --seeds 0 --resume
  python scripts/study_doran_ablation.py --tasks cola --epochs 2 --eval-limit 0 \
      --variants doran_model --lrs 1e-4 --seeds 1,2 --resume
  lora     3e-4: 0.183 ± 0.017   1e-3: 0.182 (seed 0; a tie with 3e-4's 0.183 on seed 0)
  dora     3e-4: 0.178 ± 0.017   1e-3: 0.000 (seed 0, majority class)
  doran    1e-4: 0.156 ± 0.020   3e-4: 0.142 ± 0.018   1e-3: 0.000 (seed 0, majority class)
lora keeps 1e-3, the lr its 5-seed comparison with dyndora ran at (on seed 0 the two lrs tie).
frozen (the pooler and classifier trained, the backbone frozen), one seed per lr:
  python scripts/lr_sweep.py --config configs/cola.py --metric mcc --methods frozen \
      --lrs 3e-4,3e-3,3e-2,1e-1,3e-1 --seeds 0 --epochs 2 --batch 16 --max-length 32 \
      --eval-limit 0 --name lr_sweep_cola
  frozen   3e-4: 0.000   3e-3: 0.000   3e-2: 0.094   1e-1: 0.130   3e-1: 0.023
  (docs/results/lr_sweep_cola.md). The linear probe (config.baselines: a logistic regression on
  frozen mean-pooled features, fitted to convergence, no lr) reaches 0.118.
"""

from ml_collections import config_dict

from doran_jax import config_lib, data

# From the grids in the docstring. No 'full' entry: pass lr=.
LR = {"lora": 1e-3, "dora": 3e-4, "doran": 1e-4, "dyndora": 1e-3, "frozen": 1e-1}


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
