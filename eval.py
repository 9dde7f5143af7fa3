r"""Evaluates a run's checkpoint (the latest or --step) or an adapter export on the eval split.

Prints the metrics as one JSON line and writes them next to what was evaluated
(<workdir>/eval_step<N>.json, or <adapters>/eval.json).

  python eval.py --config configs/default.py --workdir runs/default
  python eval.py --config configs/default.py --workdir runs/default --step 100
  python eval.py --config configs/sst2.py --adapters runs/sst2/export/adapters

With --prompt it chats instead: the reply of the fine-tuned causal LM (checkpoint or export, or
--base for the model as loaded) to one user message, rendered with the model's chat template.

  python eval.py --config configs/smollm2.py --workdir runs/smollm2 --prompt "What is the capital of France?"
  python eval.py --config configs/smollm2.py --adapters runs/smollm2/export/adapters \
      --prompt "Name three primes." --temperature 0.7 --top_p 0.9 --seed 1
"""

import json
import os

# transformers imports PyTorch whenever it is importable (the parity extra installs it), which
# costs ~280 MB of RSS and is never used here: the Flax path needs no torch.
os.environ.setdefault("USE_TORCH", "0")

import jax
from absl import app, flags
from ml_collections import config_flags

from doran_jax import errors, experiment

_VERBOSE = flags.DEFINE_bool("verbose", False, "Show the traceback of our own errors (or set "
                             "DORAN_VERBOSE=1); without it they print one message and exit 2.")
_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/<exp>.py[:args]", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory with checkpoints/ (default: config.workdir).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step to evaluate (default: the latest).")
_ADAPTERS = flags.DEFINE_string("adapters", None, "An adapter-only export folder instead of a checkpoint.")
_PROMPT = flags.DEFINE_string("prompt", None, "Chat: print the model's reply to this user message.")
_SYSTEM = flags.DEFINE_string("system", None, "Chat: a system message before the prompt.")
_BASE = flags.DEFINE_bool("base", False, "Chat with the model as loaded (no adapters).")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 128, "Chat: longest reply in tokens.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "Chat: 0 = greedy, else sample.")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Chat sampling: nucleus mass kept.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Chat sampling: keep the k likeliest tokens (0 = all).")
_SEED = flags.DEFINE_integer("seed", 0, "Chat sampling: PRNG seed.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  experiment.quiet_third_party_logs()
  with errors.reported(verbose=_VERBOSE.value):
    if _PROMPT.value is not None:
      sample = _TEMPERATURE.value > 0
      print(experiment.chat(
          _CONFIG.value, _PROMPT.value, workdir=_WORKDIR.value, adapters_dir=_ADAPTERS.value,
          step=_STEP.value, base=_BASE.value, system=_SYSTEM.value,
          max_new_tokens=_MAX_NEW.value, key=jax.random.key(_SEED.value) if sample else None,
          temperature=_TEMPERATURE.value if sample else 1.0, top_p=_TOP_P.value,
          top_k=_TOP_K.value))
      return
    metrics = experiment.evaluate_run(_CONFIG.value, workdir=_WORKDIR.value,
                                      adapters_dir=_ADAPTERS.value, step=_STEP.value)
  print(json.dumps(metrics))


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
