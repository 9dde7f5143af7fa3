"""Bad input stops early with a readable error: config values before any load, data files,
labels, exports, and the entry points' one-line messages."""

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from doran_jax import checkpoint, config_lib, data, errors, experiment, peft_io
from doran_jax import run as run_lib
from doran_jax.adapters import AdapterConfig
from test_run_identity import no_loading  # noqa: F401  pylint: disable=unused-import
from test_trainer import tiny_config

REPO = pathlib.Path(__file__).resolve().parents[1]

# (override, text the error must contain): each is a value the issue found accepted or
# reported late (after compiling, inside jit, or after data and model had loaded).
INVALID = [
    ({"num_steps": -5}, "num_steps=-5 must be an integer >= 1"),
    ({"num_steps": 0, "num_epochs": 0.0}, "num_epochs=0.0 must be a finite number > 0"),
    ({"adapter.alpha": 0.0}, "adapter.alpha=0.0 must be a finite number > 0"),
    ({"checkpoint.max_to_keep": 0}, "checkpoint.max_to_keep=0 must be an integer >= 1"),
    ({"checkpoint.every": 0}, "checkpoint.every=0 must be an integer >= 1"),
    ({"optim.accum_steps": 3}, "batch_size=8 does not divide by optim.accum_steps=3"),
    ({"adapter.method": "dorra"}, "unknown method 'dorra'; choose one of"),
    ({"adapter.mode": "fused"}, "unknown mode 'fused'; choose one of merged, factored"),
    ({"adapter.rank": 0}, "rank must be a positive integer"),
    ({"optim.lr": float("nan")}, "optim.lr=nan must be a finite number > 0"),
    ({"optim.lr": -1e-3}, "optim.lr=-0.001 must be a finite number > 0"),
    ({"optim.warmup_steps": 10}, "optim.warmup_steps=10 is more than num_steps=4"),
    ({"optim.schedule": "cosin"}, "optim.schedule='cosin' unknown"),
    ({"optim.name": "adam"}, "optim.name='adam' unknown"),
    ({"eval_batch_size": 0}, "eval_batch_size=0 must be an integer >= 1"),
    ({"batch_size": 0}, "batch_size=0 must be an integer >= 1"),
    ({"seed": -1}, "seed=-1 must be an integer >= 0"),
    ({"adapter.targets": "(query"}, "is not a valid regex"),
    ({"resume": "yes"}, "resume='yes' must be one of auto, force"),
    ({"mesh": "data:0"}, "sizes must be >= 1"),
    ({"model.tiny": "bart"}, "model.tiny='bart' is not a model family"),
    ({"model.task": "causal_lm"}, "data.source='tsv' feeds model.task classification"),
    ({"data.path": "/no/such/folder"}, "data.path='/no/such/folder' does not exist"),
    ({"data.format": "glue"}, "data.format='glue' is not a TSV format"),
    ({"data.max_length": 1}, "data.max_length=1 must be an integer > 1"),
    ({"dyndora.prune_end": 2.0, "adapter.method": "dyndora"}, "dyndora: dyndora needs 0 <= prune_start"),
    ({"model.quantize": "int4"}, "model.quantize='int4' unknown; choose one of none, int8, nf4"),
    ({"model.quantize": "nf4", "adapter.method": "dora", "adapter.mode": "merged"},
     "needs adapter.mode='factored'"),
    ({"model.quantize": "int8", "adapter.method": "full"}, "trains the backbone"),
    ({"optim.warmup_ratio": 1.5}, "optim.warmup_ratio=1.5 must lie in [0, 1)"),
    ({"optim.lr": None, "adapter.method": "dora"},
     "optim.lr is unset and optim.lr_by_method has no entry for method 'dora'"),
]


@pytest.mark.parametrize("overrides,expected", INVALID, ids=[next(iter(o)) for o, _ in INVALID])
def test_invalid_value_is_an_error_before_anything_loads(shared_data, tmp_path, no_loading,
                                                        overrides, expected):
  c = tiny_config(shared_data, tmp_path, "kind=text", **{"num_steps": 4, **overrides})
  for entry in (run_lib.setup, experiment.train, experiment.run_experiment):
    with pytest.raises(errors.ConfigError) as info:
      entry(c)
    assert expected in str(info.value)
    assert str(info.value).startswith("invalid config (")
    assert "nothing was loaded): " in str(info.value).splitlines()[0]
  with pytest.raises(errors.ConfigError, match="nothing was loaded"):
    experiment.evaluate_run(c, workdir=str(tmp_path))
  assert list(tmp_path.iterdir()) == []  # no workdir content, no checkpoints/


def test_every_problem_is_reported_at_once(shared_data, tmp_path, no_loading):
  c = tiny_config(shared_data, tmp_path, "kind=text", num_steps=-5, **{
      "optim.lr": 0.0, "checkpoint.every": 0, "adapter.method": "dorra", "adapter.mode": "x"})
  with pytest.raises(errors.ConfigError) as info:
    config_lib.validate(c)
  message = str(info.value)
  assert message.startswith("invalid config (5 problems; nothing was loaded): ")
  for text in ("num_steps=-5", "optim.lr=0.0", "checkpoint.every=0", "unknown method 'dorra'",
               "unknown mode 'x'"):
    assert text in message


def test_shipped_configs_validate():
  from configs import cola, default, llama_commonsense, sst2, tiny, vit_fgvc, vit_vtab1k
  for module in (cola, default, llama_commonsense, sst2, vit_fgvc, vit_vtab1k):
    assert config_lib.config_problems(module.get_config(), with_data=False, with_model=False) == []
  for kind in ("text", "image", "causal"):
    assert config_lib.config_problems(tiny.get_config(f"kind={kind}"), with_data=False) == []


def test_validation_reuses_adapter_config_checks():
  # The same words as AdapterConfig's own error: one source for adapter rules.
  with pytest.raises(ValueError) as direct:
    AdapterConfig(dropout=1.5)
  c = config_lib.base_config()
  with c.unlocked():
    c.adapter.dropout = 1.5
  assert f"adapter.dropout=1.5: {direct.value}" in config_lib.config_problems(c, with_data=False)


def test_apply_arg_typo_is_a_config_error():
  from configs import tiny
  with pytest.raises(errors.ConfigError, match="unknown config argument 'rnak'"):
    tiny.get_config("rnak=4")


# ------------------------------------------------------------------------------------- data


def _tsv_folder(tmp_path, train_rows, dev_rows):
  folder = tmp_path / "tsv"
  folder.mkdir()
  (folder / "train.tsv").write_bytes(b"".join(train_rows))
  (folder / "dev.tsv").write_bytes(b"".join(dev_rows))
  return folder


def test_eval_label_unseen_in_training_names_label_and_file(shared_data, tmp_path, monkeypatch):
  def refuse(*args, **kwargs):
    raise AssertionError("the model was loaded")
  monkeypatch.setattr(run_lib, "load_model", refuse)
  rows = [f"{i % 2}\tsentence number {i}\n".encode() for i in range(16)]
  folder = _tsv_folder(tmp_path, rows, rows[:6] + [b"2\ta third kind of sentence\n"])
  c = tiny_config(shared_data, tmp_path / "run", "kind=text", num_steps=2,
                  **{"data.path": str(folder), "data.limit": None, "data.eval_limit": None})
  with pytest.raises(errors.DataError) as info:
    run_lib.setup(c)
  message = str(info.value)
  assert "eval label(s) [2]" in message and str(folder / "dev.tsv") in message
  assert str(folder / "train.tsv") in message and "labels [0, 1]" in message
  assert "data.num_classes=3" in message


def test_non_utf8_tsv_names_file_and_line(tmp_path):
  folder = _tsv_folder(tmp_path, [b"1\tfine\n", b"0\tcaf\xe9 au lait\n"], [b"1\tok\n"])
  with pytest.raises(errors.DataError) as info:
    data.read_tsv(str(folder / "train.tsv"), "sst2")
  assert str(info.value).startswith(f"{folder / 'train.tsv'}:2: not UTF-8 (byte 0xe9 at column 6)")
  assert "iconv" in str(info.value)


def test_three_column_row_names_both_formats(tmp_path):
  folder = _tsv_folder(tmp_path, [b"0\ttwo\tparts\n", b"1\tfine\n"], [b"1\tok\n"])
  for fmt in ("sst2", "cola"):
    with pytest.raises(errors.DataError) as info:
      data.read_tsv(str(folder / "train.tsv"), fmt)
    message = str(info.value)
    assert message.startswith(f"{folder / 'train.tsv'}:1: 3 tab-separated column(s), expected 2")
    assert "'sst2' is label<TAB>sentence, 'cola' is sentence<TAB>label" in message
    assert "is the file in format" not in message  # no wrong-format guess for a column count


def test_swapped_columns_suggest_the_other_format(tmp_path):
  folder = _tsv_folder(tmp_path, [b"a fine film\t1\n"], [b"1\tok\n"])
  with pytest.raises(errors.DataError, match="looks like format 'cola'"):
    data.read_tsv(str(folder / "train.tsv"), "sst2")


# ---------------------------------------------------------------------------------- exports


def _our_export(tmp_path):
  folder = tmp_path / "export" / "adapters"
  trainable = {"params": {}, "adapters": {"targets": {"m": {
      "lora_a": np.ones((4, 2), np.float32), "lora_b": np.zeros((2, 4), np.float32)}}}}
  checkpoint.export_adapters(str(folder), trainable, AdapterConfig(method="lora", rank=2), {"step": 3})
  return folder


def test_load_peft_adapter_on_our_export_says_how_to_load_it(tmp_path):
  folder = _our_export(tmp_path)
  with pytest.raises(errors.UserError, match=r"is a doran_jax adapter export .*"
                     r"doran_jax.checkpoint.load_adapters\(path\)"):
    peft_io.load_peft_adapter(str(folder), {})
  assert checkpoint.load_adapters(str(folder))[1].rank == 2  # and that way works


def test_save_peft_adapter_never_overwrites_our_export(tmp_path):
  folder = _our_export(tmp_path)
  before = {p.name: p.read_bytes() for p in folder.iterdir()}
  with pytest.raises(errors.UserError, match="would overwrite; write the PEFT folder elsewhere"):
    peft_io.save_peft_adapter(str(folder), {}, {}, AdapterConfig(method="lora", rank=2),
                              base_model_name_or_path="base")
  assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
  assert not peft_io.is_doran_export(tmp_path)


# ------------------------------------------------------------------------------ entry points


def _entry(script, *args, env=None):
  return subprocess.run([sys.executable, script, *args], cwd=REPO, capture_output=True, text=True,
                        timeout=300, env={**os.environ, **(env or {})})


def test_train_py_prints_one_message_and_exits_2(shared_data, tmp_path):
  args = ["--config", "configs/tiny.py", f"--config.workdir={tmp_path / 'run'}",
          f"--config.data.path={shared_data / 'text' / 'sst2'}", "--config.num_steps=-5"]
  proc = _entry("train.py", *args, env={"DORAN_VERBOSE": "0"})
  assert proc.returncode == errors.EXIT_CODE, proc.stderr[-2000:]
  lines = proc.stderr.strip().splitlines()
  assert lines[-1].startswith("config error: invalid config (1 problem; nothing was loaded): "
                              "num_steps=-5")
  assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists()
  verbose = _entry("train.py", *args, "--verbose")
  assert verbose.returncode == errors.EXIT_CODE and "Traceback" in verbose.stderr


def test_eval_py_on_a_missing_workdir_exits_2_and_creates_nothing(shared_data, tmp_path):
  missing = tmp_path / "nope"
  proc = _entry("eval.py", "--config", "configs/tiny.py", f"--workdir={missing}",
                f"--config.data.path={shared_data / 'text' / 'sst2'}", env={"DORAN_VERBOSE": "0"})
  assert proc.returncode == errors.EXIT_CODE, proc.stderr[-2000:]
  assert proc.stderr.strip().splitlines()[-1].startswith(
      f"checkpoint error: workdir {str(missing)!r} does not exist")
  assert not missing.exists()


# ------------------------------------------------------------------------------ issue 32 (CLI)


def _refuse_model(monkeypatch):
  """run_lib.load_model raises _ModelReached: the data checks passed and the model came next."""
  class _ModelReached(Exception):
    pass

  def refuse(*args, **kwargs):
    raise _ModelReached()
  monkeypatch.setattr(run_lib, "load_model", refuse)
  return _ModelReached


def _label_config(shared_data, tmp_path, train_labels, dev_labels, **overrides):
  rows = lambda labels: [f"{y}\tsentence number {i}\n".encode() for i, y in enumerate(labels)]  # noqa: E731
  folder = _tsv_folder(tmp_path, rows(train_labels), rows(dev_labels))
  return folder, tiny_config(shared_data, tmp_path / "run", "kind=text", num_steps=2, **{
      "data.path": str(folder), "data.limit": None, "data.eval_limit": None, **overrides})


def test_training_set_with_one_class_is_a_data_error(shared_data, tmp_path, monkeypatch):
  _refuse_model(monkeypatch)
  folder, c = _label_config(shared_data, tmp_path, [1] * 12, [0, 1] * 4)
  with pytest.raises(errors.DataError) as info:
    run_lib.setup(c)
  message = str(info.value)
  assert f"the training data ({folder / 'train.tsv'}, 12 rows) has only label 1" in message
  assert "the eval split has labels [0, 1]" in message
  assert "needs at least two classes" in message and "data.train_split" in message


def test_training_labels_that_skip_classes_are_a_data_error(shared_data, tmp_path, monkeypatch):
  reached = _refuse_model(monkeypatch)
  folder, c = _label_config(shared_data, tmp_path, [0, 5] * 6, [0, 5] * 3)
  with pytest.raises(errors.DataError) as info:
    run_lib.setup(c)
  message = str(info.value)
  assert f"the training labels in {folder / 'train.tsv'} are [0, 5]" in message
  assert "the head gets 6 outputs (max label + 1), 4 of which ([1, 2, 3, 4]) never occur" in message
  assert "Renumber the labels to 0..1 (0->0, 5->1)" in message and "data.num_classes=6" in message
  # A declared class count says the absent classes are real: the run goes on to the model.
  with c.unlocked():
    c.data.num_classes = 6
  with pytest.raises(reached):
    run_lib.setup(c)


def test_label_check_leaves_non_integer_targets_alone():
  # Regression-style float targets are not class ids (no source yields them today).
  train = data.Dataset({"x": np.zeros(4), "labels": np.array([0.5, 0.5, 0.5, 0.5])}, 1, None)
  data.check_labels(train, train, 1)


@pytest.mark.parametrize("tiny,max_length,limit", [("bert", 65, 64), ("gpt2", 100, 64),
                                                   ("roberta", 65, 64)])
def test_max_length_beyond_learned_positions_is_a_config_error(shared_data, tmp_path, no_loading,
                                                               tiny, max_length, limit):
  c = tiny_config(shared_data, tmp_path, "kind=text", **{"model.tiny": tiny,
                                                         "data.max_length": max_length})
  with pytest.raises(errors.ConfigError) as info:
    run_lib.setup(c)
  assert (f"data.max_length={max_length} is more than the {limit} positions model 'tiny {tiny}' "
          f"({tiny}) has learned embeddings for; set data.max_length <= {limit}.") in str(info.value)
  with c.unlocked():
    c.data.max_length = limit
  assert not any("positions" in p for p in config_lib.config_problems(c))


def test_max_length_beyond_rope_positions_is_a_warning(shared_data, tmp_path, caplog):
  # Rotary positions extrapolate (no NaN), so a longer context is the user's call.
  c = tiny_config(shared_data, tmp_path, "kind=causal", **{"data.max_length": 100})
  with caplog.at_level("WARNING"):
    assert config_lib.config_problems(c) == []
  assert "data.max_length=100 is more than the 64 positions model 'tiny llama'" in caplog.text


def _parse_flags(*args):
  """train.py's --config flag parsed by absl and ml_collections, as on the command line."""
  from absl import flags
  from ml_collections import config_flags
  argv = ["train.py", "--config", str(REPO / "configs" / "tiny.py"), *args]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True,
                                  sys_argv=argv)
  values(argv)
  return values.config


def test_none_on_the_command_line():
  c = _parse_flags("--config.data.limit=None", "--config.checkpoint.max_to_keep=None",
                   "--config.optim.warmup_ratio=None", "--config.progress_bar=None",
                   "--config.head=None")
  assert c.data.limit is None and c.checkpoint.max_to_keep is None
  assert c.optim.warmup_ratio is None and c.progress_bar is None and c.head is None
  assert config_lib.config_problems(c, with_data=False) == []
  # Keys whose default is None take a value; 'none' stays a string where it is a real value.
  c = _parse_flags("--config.data.num_classes=3", "--config.data.eval_limit=None",
                   "--config.data.data_dir=/tmp", "--config.model.quantize=none",
                   "--config.data.limit=7")
  assert (c.data.num_classes, c.data.eval_limit, c.data.data_dir) == (3, None, "/tmp")
  assert c.model.quantize == "none" and c.data.limit == 7
  # An int that cannot be None is reported by validation, not by a parser traceback.
  c = _parse_flags("--config.num_steps=None")
  assert any("num_steps=None must be an integer" in p for p in config_lib.config_problems(c))
  from configs import tiny
  assert tiny.get_config("limit=None").data.limit is None


def test_none_reaches_train_py(shared_data, tmp_path):
  # The real entry point: the flag parses, so the run stops at the (deliberate) bad value.
  proc = _entry("train.py", "--config", "configs/tiny.py", f"--config.workdir={tmp_path / 'run'}",
                f"--config.data.path={shared_data / 'text' / 'sst2'}", "--config.data.limit=None",
                "--config.checkpoint.max_to_keep=None", "--config.seed=-1",
                env={"DORAN_VERBOSE": "0"})
  assert proc.returncode == errors.EXIT_CODE, proc.stderr[-2000:]
  assert proc.stderr.strip().splitlines()[-1].startswith(
      "config error: invalid config (1 problem; nothing was loaded): seed=-1")


def _hf_folder(tmp_path, name, config=None):
  folder = tmp_path / name
  folder.mkdir()
  (folder / "notes.txt").write_text("not a checkpoint")
  if config is not None:
    (folder / "config.json").write_text(config)
  return folder


@pytest.mark.parametrize("case", ["no_config_json", "unsupported_model_type", "unknown_hub_name"])
def test_bad_model_inputs_print_one_line_and_exit_2(shared_data, tmp_path, case):
  # Before: a plain FileNotFoundError / ValueError under a traceback wall, exit 1.
  name, expected = {
      "no_config_json": (_hf_folder(tmp_path, "ckpt"), "file error: no config.json in "),
      "unsupported_model_type": (_hf_folder(tmp_path, "t5", '{"model_type": "t5"}'),
                                 "checkpoint error: "),
      "unknown_hub_name": ("no-such-model", "checkpoint error: model 'no-such-model' is not a "
                           "local folder"),
  }[case]
  proc = _entry("train.py", "--config", "configs/tiny.py", f"--config.workdir={tmp_path / 'run'}",
                f"--config.data.path={shared_data / 'text' / 'sst2'}", "--config.model.tiny=",
                f"--config.model.name={name}", env={"DORAN_VERBOSE": "0", "HF_HUB_OFFLINE": "1"})
  assert proc.returncode == errors.EXIT_CODE, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr
  assert proc.stderr.strip().splitlines()[-1].startswith(expected), proc.stderr[-1000:]
  if case == "unsupported_model_type":
    assert "has model_type 't5', which is not one of doran_jax's families" in proc.stderr


def test_huge_eval_batch_is_refused_before_training(shared_data, tmp_path, no_loading):
  # Nothing is allocated: the estimate alone says it cannot fit on any machine.
  c = tiny_config(shared_data, tmp_path, "kind=causal", eval_batch_size=10 ** 9)
  with pytest.raises(errors.ConfigError) as info:
    run_lib.setup(c)
  message = str(info.value)
  assert message.startswith("eval_batch_size=1000000000 needs about ")
  assert "64x30522 float32 logits" in message and "--config.eval_batch_size=" in message
  assert list(tmp_path.iterdir()) == []


def test_eval_batch_suggestion_fits(shared_data, tmp_path):
  from doran_jax import memory
  c = tiny_config(shared_data, tmp_path, "kind=causal", eval_batch_size=4096)
  cfg = config_lib.model_config(c.model)
  per_row = memory.eval_row_bytes(cfg, "causal_lm", 64)
  available = 100 * per_row
  memory.check_eval_batch(c.copy_and_resolve_references(), cfg, [], available=4096 * per_row)
  with pytest.raises(errors.ConfigError, match=r"Set --config.eval_batch_size=32 \(or lower\)"):
    memory.check_eval_batch(c, cfg, [], available=available)   # 50 rows in half -> 32
  with pytest.raises(errors.ConfigError, match="Not even one row fits: lower data.max_length"):
    memory.check_eval_batch(c, cfg, [], available=per_row // 4)
