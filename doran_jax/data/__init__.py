"""Data sets as in-memory numpy arrays with step-addressed, per-host batches.

`load_dataset(data_cfg, split)` reads one of the sources below and returns a `Dataset` whose
`batch(step, ...)` is a pure function of the step, so exact resume needs only the step and every
host of a multi-host run reads only its own shard.

Sources (`data_cfg.source`), one module each, collected in registry.py:
  chatterbot   topic classification of the real English utterances shipped by the
               `chatterbot-corpus` package (the offline default; see `chatterbot_examples`).
  tsv          local sentence-classification files `{path}/{split}.tsv` ('sst2' = label<TAB>text,
               'cola' = text<TAB>label).
  tfds         text classification through `tfds.data_source` (array_record; no TensorFlow).
  tfds_image   image classification through `tfds.data_source` (ViT preprocessing).
  commonsense  the DoRA paper's commonsense-reasoning JSON files (see doran_jax.commonsense).
  instruction  `{path}/{split}.jsonl` prompt/completion or Alpaca records, loss on the completion.
  chat         `{path}/{split}.jsonl` conversations (`messages`) rendered with the tokenizer's
               chat template, loss on the assistant turns.

Causal-LM sources truncate (or, with data.drop_long, drop) over-long examples and, with
data.packing, pack several training examples per row (packing.py).

Example:
  >>> cfg = default_data_config("chatterbot", max_length=32)
  >>> train = load_dataset(cfg, "train", tokenizer=tokenizer)
  >>> batch = train.batch(0, 32, seed=0)          # {'input_ids': (32, 32) int32, ..., 'labels'}
"""

from doran_jax.data import causal, chat, instruction, packing, registry
from doran_jax.data.base import SPLITS, LoadContext, Source, subset_indices, tokenize_texts
from doran_jax.data.causal import read_records
from doran_jax.data.chat import tokenize_conversation
from doran_jax.data.chatterbot import (_chatterbot_split, chatterbot_examples, chatterbot_folder,
                                       stratified_split)
from doran_jax.data.config import config_problems, default_data_config
from doran_jax.data.dataset import Dataset, check_eval_labels, check_labels
from doran_jax.data.packing import pack
from doran_jax.data.registry import (DEFAULT_SPLITS, SOURCE_TASKS, SOURCES, load_dataset,
                                     split_name)
from doran_jax.data.tfds import _text, normalize_pixels, resize_image, tfds_source
from doran_jax.data.tsv import TSV_FORMATS, TSV_LABEL_NAMES, read_tsv
