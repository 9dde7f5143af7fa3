"""Runs an entry point (train.py, eval.py) with tests/bucket_fs.py standing in for gs://, so a
test can run the documented pod command as written (used by test_bucket_paths).

  DORAN_TEST_BUCKET=/tmp/bucket python tests/bucket_worker.py train.py --config ... \
      --config.model.name=gs://my-bucket/llama-7b-flax
"""

import os
import runpy
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path[:0] = [REPO, HERE]  # this checkout's doran_jax, and bucket_fs beside this file

import bucket_fs  # noqa: E402

if __name__ == "__main__":
  bucket_fs.register(os.environ["DORAN_TEST_BUCKET"])
  script = os.path.join(REPO, sys.argv[1])
  sys.argv = [script] + sys.argv[2:]
  runpy.run_path(script, run_name="__main__")
