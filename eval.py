r"""Evaluates a run's checkpoint (the latest or --step) or an adapter export on the eval split.

Prints the metrics as one JSON line and writes them next to what was evaluated
(<workdir>/eval_step<N>.json, or <adapters>/eval.json).

  python eval.py --config configs/default.py --workdir runs/default
  python eval.py --config configs/default.py --workdir runs/default --step 100
  python eval.py --config configs/sst2.py --adapters runs/sst2/export/adapters
"""

import json
import os

# transformers imports PyTorch whenever it is importable (the parity extra installs it), which
# costs ~280 MB of RSS and is never used here: the Flax path needs no torch.
os.environ.setdefault("USE_TORCH", "0")

from absl import app, flags
from ml_collections import config_flags

from doran_jax import errors, experiment

_VERBOSE = flags.DEFINE_bool("verbose", False, "Show the traceback of our own errors (or set "
                             "DORAN_VERBOSE=1); without it they print one message and exit 2.")
_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/<exp>.py[:args]", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory with checkpoints/ (default: config.workdir).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step to evaluate (default: the latest).")
_ADAPTERS = flags.DEFINE_string("adapters", None, "An adapter-only export folder instead of a checkpoint.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  experiment.quiet_third_party_logs()
  with errors.reported(verbose=_VERBOSE.value):
    metrics = experiment.evaluate_run(_CONFIG.value, workdir=_WORKDIR.value,
                                      adapters_dir=_ADAPTERS.value, step=_STEP.value)
  print(json.dumps(metrics))


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
