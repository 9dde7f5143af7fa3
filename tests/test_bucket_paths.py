"""Model folders and workdirs in a bucket (issue 33, item 5): the TPU pod command of
docs/scaling.md (`--config.model.name=gs://my-bucket/llama-7b-flax`) run as written, and the
untrusted-files rules where the files are objects in a store rather than local files.

Two non-local filesystems stand in for a bucket (gcsfs is not installed and the tests are offline):
fsspec's `memory://` (in-process; no local path at all), and `bucket_fs`, fsspec's DirFileSystem
over a temp folder registered as `gs://`, for runs whose checkpoints orbax must write (its
tensorstore writer takes only local paths and gs://; see bucket_fs.py for the one difference from
a pod). doran_jax reaches both only through URLs and doran_jax.paths.
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys

import fsspec
import jax
import numpy as np
import pytest

import bucket_fs
from doran_jax import config_lib, errors, experiment, models, paths, progress, workdir_lock
from doran_jax.models import hf_io
from test_trainer import tiny_config

REPO = pathlib.Path(__file__).resolve().parents[1]
MEMORY = fsspec.filesystem("memory")


@pytest.fixture
def memory_bucket(request):
  """memory://<unique>/ (removed afterwards)."""
  root = f"/{request.node.name.replace('[', '-').replace(']', '')}"
  yield "memory:/" + root
  if MEMORY.exists(root):
    MEMORY.rm(root, recursive=True)


@pytest.fixture
def gs_bucket(tmp_path):
  """gs:// served from tmp_path/bucket for this test; returns that folder."""
  root = bucket_fs.register(tmp_path / "bucket")
  yield pathlib.Path(root)
  bucket_fs.unregister()


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
  """A tiny random LLaMA in transformers' layout: config.json, three safetensors shards with
  their index, and a tokenizer (MiniLM's, whose vocabulary the model's embedding matches)."""
  folder = tmp_path_factory.mktemp("llama")
  bb = models.from_config(models.tiny_config("llama", vocab_size=30522), "causal_lm", seed=0)
  hf_io.save_pretrained(jax.device_get(bb.params), dict(bb.config), str(folder),
                        max_shard_bytes=200_000)
  models.load_tokenizer("minilm").save_pretrained(str(folder))
  assert len(list(folder.glob("model-*-of-*.safetensors"))) > 1
  return folder


def _upload(local: pathlib.Path, url: str) -> str:
  fs, path = paths.filesystem(url)
  fs.put(str(local) + "/", path, recursive=True)
  return url


def _leaves(params):
  return [np.asarray(x) for x in jax.tree_util.tree_leaves(params)]


# ------------------------------------------------------------------------ the pod command


def _pod_command(shared_data, *extra):
  """docs/scaling.md's TPU pod command, as written, plus a workdir in the bucket and the sizes
  of a test (a 16-device CPU mesh stands in for the v4-32's 16 chips)."""
  return [
      sys.executable, str(REPO / "tests" / "bucket_worker.py"), "train.py",
      "--config", f"{REPO / 'configs' / 'llama_commonsense.py'}:method=doran",
      "--config.mesh=data:-1,fsdp:16,model:1", "--config.sharding_rules=fsdp",
      "--config.distributed=on", "--config.model.name=gs://my-bucket/llama-7b-flax",
      "--config.workdir=gs://my-bucket/runs/llama_commonsense_doran",
      # test sizes
      f"--config.data.path={shared_data / 'commonsense'}", "--config.data.limit=32",
      "--config.data.eval_limit=8", "--config.adapter.rank=4", "--config.adapter.alpha=8",
      "--config.generate.enabled=False",
      "--config.optim.schedule=constant", "--config.optim.warmup_steps=0",
      "--config.checkpoint.every=2", "--config.progress_bar=False", *extra]


def _run_pod(shared_data, bucket, cwd, *extra):
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
  env.update(XLA_FLAGS="--xla_force_host_platform_device_count=16", HF_HUB_OFFLINE="1",
             TRANSFORMERS_OFFLINE="1", USE_TORCH="0", DORAN_TEST_BUCKET=str(bucket),
             JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="1",
             JAX_PROCESS_ID="0")
  proc = subprocess.run(_pod_command(shared_data, *extra), cwd=cwd, env=env, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return proc.stdout + proc.stderr


def _steps(metrics_text: str) -> list[int]:
  return [json.loads(line)["step"] for line in metrics_text.splitlines()
          if "train/loss" in json.loads(line)]


@pytest.mark.slow
def test_the_pod_command_trains_from_and_into_a_bucket(shared_data, llama_folder, tmp_path):
  """Three runs of the command on a 16-device CPU mesh (~1 min each on a quiet 2-core machine,
  mostly XLA compiling for 16 devices): it reads the model from gs://, writes run.json,
  metrics, checkpoints, results and the export there, finds the run complete the second time,
  and resumes from the bucket's checkpoint the third."""
  bucket = tmp_path / "bucket"
  bucket_fs.register(bucket)
  try:
    _upload(llama_folder, "gs://my-bucket/llama-7b-flax")
  finally:
    bucket_fs.unregister()
  cwd = tmp_path / "cwd"  # nothing may land here (a path taken for local by mistake)
  cwd.mkdir()
  run = bucket / "my-bucket" / "runs" / "llama_commonsense_doran"

  out = _run_pod(shared_data, bucket, cwd, "--config.num_steps=2")
  assert "training doran for 2 steps" in out
  assert sorted(p.name for p in run.iterdir()) == [
      "checkpoints", "export", "metrics.jsonl", "results.json", "run.json"]   # the lock is gone
  assert _steps((run / "metrics.jsonl").read_text()) == [1, 2]
  assert sorted(os.listdir(run / "checkpoints")) == ["2"]
  assert json.loads((run / "run.json").read_text())["config"]["model.name"] == (
      "gs://my-bucket/llama-7b-flax")
  results = json.loads((run / "results.json").read_text())
  assert results["status"] == "done" and results["steps"] == 2
  assert (run / "export" / "adapters" / "checksums.json").is_file()

  # The same command again: complete, nothing rewritten.
  before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
  out = _run_pod(shared_data, bucket, cwd, "--config.num_steps=2")
  assert "this run is complete: gs://my-bucket/runs/llama_commonsense_doran" in out
  assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()} == before

  # On to 4 steps: resumes from the bucket's step-2 checkpoint; each step's record once.
  out = _run_pod(shared_data, bucket, cwd, "--config.num_steps=4", "--config.resume=force")
  assert "resumed from step 2" in out
  assert _steps((run / "metrics.jsonl").read_text()) == [1, 2, 3, 4]
  assert sorted(os.listdir(run / "checkpoints")) == ["2", "4"]
  assert json.loads((run / "results.json").read_text())["steps"] == 4
  assert list(cwd.iterdir()) == []


# ------------------------------------------------------------------------ reading a model folder


def test_a_model_folder_in_memory_loads_as_the_local_one(llama_folder, memory_bucket):
  url = _upload(llama_folder, memory_bucket + "/llama")
  local, remote = (models.load_backbone(p, "causal_lm") for p in (str(llama_folder), url))
  assert all(np.array_equal(a, b) for a, b in zip(_leaves(local.params), _leaves(remote.params)))
  assert remote.source == url
  text = "is the sky blue?"
  assert (models.load_tokenizer(url)(text)["input_ids"]
          == models.load_tokenizer(str(llama_folder))(text)["input_ids"])
  assert models.read_config(url)["model_type"] == "llama"


@pytest.mark.parametrize("entry", ["../x.safetensors", "../../etc/passwd", "a/../../x.safetensors",
                                   "/etc/passwd", "gs://other-bucket/model.safetensors",
                                   "./model-00001-of-00003.safetensors", ""])
def test_an_index_entry_outside_a_bucket_folder_is_refused(llama_folder, memory_bucket, entry):
  url = _upload(llama_folder, memory_bucket + "/llama")
  MEMORY.pipe_file(memory_bucket[len("memory:/"):] + "/x.safetensors", b"not read")
  index_url = url + "/" + hf_io.INDEX
  index = json.loads(paths.read_bytes(index_url))
  name = next(iter(index["weight_map"]))
  index["weight_map"][name] = entry
  paths.write_bytes(index_url, json.dumps(index).encode())
  with pytest.raises(errors.CheckpointError, match=r"model\.safetensors\.index\.json entry") as e:
    models.load_backbone(url, "causal_lm")
  assert repr(entry) in str(e.value)


def test_a_damaged_safetensors_header_in_a_bucket_is_refused(llama_folder, memory_bucket):
  url = _upload(llama_folder, memory_bucket + "/llama")
  shard = url + "/model-00001-of-00003.safetensors"
  data = paths.read_bytes(shard)
  n = int.from_bytes(data[:8], "little")
  header = json.loads(data[8:8 + n])
  name = next(k for k in header if k != "__metadata__")
  # A header claiming a tensor far larger than the file: refused before any data is read.
  header[name]["shape"] = [8_000_000, 32]
  header[name]["data_offsets"] = [0, 8_000_000 * 32 * 4]
  raw = json.dumps(header).encode()
  paths.write_bytes(shard, len(raw).to_bytes(8, "little") + raw + data[8 + n:])
  with pytest.raises(errors.CheckpointError, match=f"not a valid safetensors file.*{name}"):
    models.load_backbone(url, "causal_lm")
  paths.write_bytes(shard, data[:5])
  with pytest.raises(errors.CheckpointError, match="shorter than its 8-byte header"):
    models.load_backbone(url, "causal_lm")


def test_a_hub_name_still_goes_to_the_hub_and_fails_clearly_offline(monkeypatch):
  def no_fsspec(url):
    raise AssertionError(f"a hub name reached the bucket layer: {url}")
  monkeypatch.setattr(paths, "filesystem", no_fsspec)
  with pytest.raises(errors.CheckpointError,
                     match="'my-org/llama-7b-flax' is not a local folder and could not be fetched "
                           "from the Hugging Face hub"):
    models.load_backbone("my-org/llama-7b-flax", "causal_lm")


def test_remote_paths_that_cannot_be_read_say_why(memory_bucket):
  with pytest.raises(errors.CheckpointError, match="Copy it first"):
    models.load_backbone("gs://my-bucket/smollm2.Q4_1.gguf", "causal_lm")
  with pytest.raises(errors.CheckpointError, match="does not exist"):
    models.load_backbone(memory_bucket + "/nothing-here", "causal_lm")
  # No gcsfs here (the `gcs` extra): the message names the install.
  with pytest.raises(errors.UserError, match=r"needs gcsfs \(bash scripts/setup.sh gcs"):
    models.load_backbone("gs://my-bucket/llama-7b-flax", "causal_lm")
  with pytest.raises(errors.UserError, match="pass local files as plain paths"):
    models.load_backbone("file:///tmp/llama", "causal_lm")


def test_a_data_path_in_a_bucket_is_a_config_error(shared_data, tmp_path):
  c = tiny_config(shared_data, tmp_path, "kind=text", **{"data.path": "gs://my-bucket/sst2"})
  with pytest.raises(errors.ConfigError, match="data files are read from local disk"):
    config_lib.validate(c)


# ------------------------------------------------------------------------ writing a workdir


def test_a_bucket_workdir_is_written_once_and_resumes(shared_data, gs_bucket, monkeypatch):
  """Results once; metrics.jsonl uploaded once per writer (not once per step: an object store
  has no append), each step's record once across a pause and a resume."""
  monkeypatch.setattr(progress, "REMOTE_FLUSH_S", 1e9)  # flushes on close only, however slow
  uploads = []
  write = paths.write_bytes
  monkeypatch.setattr(paths, "write_bytes",
                      lambda url, data, **kw: (uploads.append(url), write(url, data, **kw))[1])
  workdir = "gs://my-bucket/runs/tiny"
  c = tiny_config(shared_data, workdir, "kind=text,method=lora", num_steps=4,
                  **{"checkpoint.every": 2, "log_every": 100})
  assert experiment.train(c, max_steps=2)["status"] == "paused"
  assert experiment.train(c)["status"] == "done"
  run = gs_bucket / "my-bucket" / "runs" / "tiny"
  assert _steps((run / "metrics.jsonl").read_text()) == [1, 2, 3, 4]
  assert uploads.count(f"{workdir}/results.json") == 1
  # pause, resume, final eval: three writers, each flushing once
  assert uploads.count(f"{workdir}/metrics.jsonl") == 3
  assert uploads.count(f"{workdir}/run.lock") == 2 and not (run / "run.lock").exists()
  assert sorted(os.listdir(run / "checkpoints")) == ["2", "4"]
  metrics = experiment.evaluate_run(c, workdir=workdir)
  assert json.loads((run / "eval_step4.json").read_text()) == json.loads(json.dumps(metrics))


def test_another_runs_bucket_workdir_is_left_as_it_was(shared_data, gs_bucket):
  workdir = "gs://my-bucket/runs/theirs"
  c = tiny_config(shared_data, workdir, "kind=text,method=lora", num_steps=2)
  theirs = tiny_config(shared_data, workdir, "kind=text,method=dora", num_steps=2)
  assert experiment.train(theirs)["status"] == "done"
  run = gs_bucket / "my-bucket" / "runs" / "theirs"
  before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
  with pytest.raises(errors.RunMismatchError, match="adapter.method"):
    experiment.train(c)
  assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_a_workdir_orbax_cannot_write_is_refused_before_any_write(shared_data, memory_bucket):
  c = tiny_config(shared_data, memory_bucket + "/run", "kind=text,method=lora", num_steps=2)
  with pytest.raises(errors.UserError, match="orbax .* takes local paths and gs:// only"):
    experiment.train(c)
  assert not MEMORY.exists(memory_bucket[len("memory:/"):])


def test_the_workdir_lock_in_a_bucket(memory_bucket):
  workdir = memory_bucket + "/run"
  mine = workdir_lock.acquire(workdir)
  with pytest.raises(errors.WorkdirBusyError, match=f"{workdir}/run.lock"):
    workdir_lock.acquire(workdir)  # the same process counts as a live holder
  workdir_lock.release(workdir, mine)
  assert workdir_lock.read(workdir) is None
  # Another host's lock: never taken over, never removed; the message names the URL to delete.
  other = {"host": "tpu-worker-7", "pid": 1234, "start": "1", "since": "earlier"}
  paths.write_bytes(f"{workdir}/run.lock", json.dumps(other).encode())
  with pytest.raises(errors.WorkdirBusyError, match=f"delete {workdir}/run.lock"):
    workdir_lock.acquire(workdir)
  workdir_lock.release(workdir, mine)
  assert workdir_lock.read(workdir) == other
  # A lock of a process of this host that is gone: taken over.
  paths.write_bytes(f"{workdir}/run.lock",
                    json.dumps({**other, "host": socket.gethostname(), "pid": 2**22 + 7}).encode())
  assert workdir_lock.acquire(workdir) == workdir_lock.read(workdir)


def test_folder_writers_in_a_bucket_keep_their_rules(llama_folder, memory_bucket):
  url = _upload(llama_folder, memory_bucket + "/llama")
  bb = models.load_backbone(url, "causal_lm")
  for target in (url, url + "/"):  # the model's own folder, however it is spelt
    with pytest.raises(errors.UserError, match="the folder the model was loaded from"):
      models.save_pretrained(bb, bb.params, target, overwrite=True)
  theirs = memory_bucket + "/theirs"
  paths.write_bytes(theirs + "/notes.txt", b"precious")
  with pytest.raises(errors.UserError, match=r"is not empty \(it holds notes.txt\)"):
    models.save_pretrained(bb, bb.params, theirs)
  assert paths.read_bytes(theirs + "/notes.txt") == b"precious"
  out = memory_bucket + "/merged"
  models.save_pretrained(bb, bb.params, out, tokenizer=models.load_tokenizer(url))
  assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(paths.listdir(out))
  again = models.load_backbone(out, "causal_lm")
  assert all(np.array_equal(a, b) for a, b in zip(_leaves(bb.params), _leaves(again.params)))
