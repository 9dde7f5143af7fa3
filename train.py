r"""Fine-tunes a pretrained Flax backbone with an adapter; see configs/ for experiments.

  python train.py --config configs/default.py
  python train.py --config configs/sst2.py:method=dora --config.adapter.rank=16 --workdir runs/sst2_dora

Exit status: 0 the run finished (or was already complete); 2 (errors.EXIT_CODE) an error you can
fix, printed as one line; 143 (errors.PREEMPTED_EXIT_CODE, 128 + SIGTERM) stopped by SIGTERM
(or one Ctrl-C) after saving a checkpoint, so a scheduler can tell a preempted run from a
finished one: run the same command again to resume; 1 a bug (with its traceback).
"""

import os
import sys

# transformers imports PyTorch whenever it is importable (the parity extra installs it), which
# costs ~280 MB of RSS and is never used here: the Flax path needs no torch.
os.environ.setdefault("USE_TORCH", "0")

from absl import app, flags
from ml_collections import config_flags

from doran_jax import errors, experiment

_VERBOSE = flags.DEFINE_bool("verbose", False, "Show the traceback of our own errors (or set "
                             "DORAN_VERBOSE=1); without it they print one message and exit 2.")
_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/<exp>.py[:args]", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics and exports (default: config.workdir).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  experiment.quiet_third_party_logs()
  with errors.reported(verbose=_VERBOSE.value):
    results = experiment.run_experiment(_CONFIG.value, _WORKDIR.value)
  if results.get("status") == "preempted":
    sys.exit(errors.PREEMPTED_EXIT_CODE)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
