"""Shared config building for configs/*.py (big_vision style: small Python files, locked dicts).

`configs/<exp>.py:get_config(arg)` starts from `base_config()`, sets what the experiment needs and
applies `arg` ("method=dora,rank=16") with `apply_arg`. Locked: a typo in an override is an error.
`validate(config)` checks every value before anything is loaded (run.setup, train.py and eval.py
call it) and reports all problems at once.

Precedence, lowest first: base_config, the config file, the method's reference recipe
(`Method.recipe`, applied by apply_arg when config.method_recipe is True), the config argument,
command-line flags (`--config.optim.lr=...`, applied after get_config).

Learning rate: a config file may leave `optim.lr` unset (a float placeholder) and carry
`optim.lr_by_method`, a table {method: lr}; `resolved(config)` (called by run.setup) fills
optim.lr from the table for the config's method. An lr given explicitly (`:lr=...` or the flag)
wins over the table.

None on the command line: `--config.data.limit=None` (any int, float or bool field, and `None`
exactly for a str field) and `configs/x.py:limit=None` set the value to None; importing this
module registers those parsers with ml_collections' config_flags. Keys whose default is None are
typed placeholders (`config_dict.placeholder(int)`), so they can be given a value too.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import re
from typing import Any, Mapping

import ml_collections
from absl import flags, logging
from ml_collections import config_dict, config_flags

from doran_jax import data, fingerprint, models, optim, quant, sharding
from doran_jax.adapters import method as method_registry
from doran_jax.adapters.config import AdapterConfig
from doran_jax.errors import ConfigError, UserError
from doran_jax.models import registry as model_registry

# Short names accepted in `--config configs/x.py:name=value,...`.
ARG_KEYS = {
    "method": "adapter.method", "rank": "adapter.rank", "alpha": "adapter.alpha",
    "targets": "adapter.targets", "mode": "adapter.mode", "lr": "optim.lr", "seed": "seed",
    "steps": "num_steps", "epochs": "num_epochs", "batch": "batch_size", "workdir": "workdir",
    "task": "data.task", "path": "data.path", "data_dir": "data.data_dir", "limit": "data.limit",
    "noise_std": "adapter.noise_std", "model": "model.name", "dtype": "model.dtype",
    "quantize": "model.quantize",
}


def adapter_defaults(**overrides) -> ml_collections.ConfigDict:
  d = AdapterConfig().to_dict()
  d.pop("transposed")  # detected from the model at load time
  d.update(overrides)
  return ml_collections.ConfigDict(d)


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.workdir = "runs/default"
  # 'auto': resume the workdir's run if it is this config's (run.json), else stop with the
  # differing keys; 'force': continue it under this config anyway (doran_jax.fingerprint).
  c.resume = "auto"
  # num_labels=0: taken from the data set.
  c.model = ml_collections.ConfigDict(dict(
      name="minilm", task="classification", num_labels=0, dtype="float32", param_dtype="float32",
      tiny="", tokenizer="", remat=False, config_overrides={},
      # Memory-lean attention and GELU on CPU (models/modeling/fused_ops.py); same maths.
      fused_layers=True,
      # Frozen Dense kernels stored 'int8' | 'nf4' (doran_jax/quant.py; needs adapter.mode=
      # 'factored'); double_quant: nf4's block scales in 8 bits (QLoRA's double quantisation).
      quantize="none", double_quant=False))
  c.adapter = adapter_defaults()
  c.head = config_dict.placeholder(str)   # None -> the task's default head regex
  c.freeze = ()                            # regexes of trainable leaves to keep fixed (logged)
  c.optim = ml_collections.ConfigDict(dict(
      name="adamw", lr=1e-3, warmup_steps=50, schedule="linear", weight_decay=0.0, b1=0.9,
      b2=0.999, eps=1e-8, clip_norm=1.0, accum_steps=1,
      # warmup_ratio (a fraction of num_steps) replaces warmup_steps when set.
      warmup_ratio=config_dict.placeholder(float),
      # {method: lr}, used when optim.lr is left unset (see `resolved`).
      lr_by_method={}))
  c.batch_size = 32
  c.eval_batch_size = 128
  c.num_steps = 0          # 0 -> from num_epochs
  c.num_epochs = 1.0
  c.log_every = 50        # a plain progress line every N steps (also in batch logs)
  c.progress_bar = config_dict.placeholder(bool)   # None: a tqdm bar on a terminal or notebook
  c.tensorboard = False    # True: also write <workdir>/tensorboard (needs tensorboardX)
  c.checkpoint = ml_collections.ConfigDict(dict(every=500, max_to_keep=2))
  c.export = ml_collections.ConfigDict(dict(merged=False))
  c.baselines = ()         # ("majority", "frozen", "linear_probe") for classification
  # Apply the method's reference recipe (Method.recipe, e.g. DynDoRA's official settings) over
  # the config file's values; the config argument and flags still win.
  c.method_recipe = True
  # Commonsense accuracy at the end of causal_lm runs, on the eval split's first
  # limit_per_task records of each task (0: all): by greedy generation with the answer word
  # extracted (enabled) and by multiple-choice log-likelihood (multiple_choice).
  c.generate = ml_collections.ConfigDict(dict(enabled=False, max_new_tokens=32, limit_per_task=0,
                                              multiple_choice=False))
  # DynDoRA's schedule (fractions of num_steps) and variance regulariser weight.
  c.dyndora = ml_collections.ConfigDict(dict(
      prune_start=0.15, prune_end=0.5, prune_interval=10, ema_beta=0.9, eta=0.1))
  c.mesh = "data:-1,fsdp:1,model:1"   # axis:size, one size may be -1 (the remaining devices)
  c.sharding_rules = "replicated"
  c.distributed = "auto"
  return c


def apply_arg(config: ml_collections.ConfigDict, arg, aliases=None) -> ml_collections.ConfigDict:
  """Applies 'k=v,k=v' (short names in ARG_KEYS, `aliases`, or dotted paths), then locks.

  Example:
    >>> apply_arg(base_config(), "method=dora,rank=16").adapter.rank
    16
  """
  names = {**ARG_KEYS, **(aliases or {})}
  given = set()
  if arg:
    for item in str(arg).split(","):
      if "=" not in item:
        raise ConfigError(f"config argument {item!r} must look like name=value; known names: "
                         f"{', '.join(sorted(names))}")
      key, value = (s.strip() for s in item.split("=", 1))
      path = names.get(key, key)
      parent, leaf = _parent(config, path)
      if leaf not in parent:
        raise ConfigError(f"unknown config argument {key!r}; known names: {', '.join(sorted(names))}")
      current = parent[leaf]
      if current is None:
        current = _placeholder_default(parent, leaf)
      parent[leaf] = _parse(value, current)
      given.add(path)
  if config.get("method_recipe", False):
    apply_recipe(config, skip=given)
  config.lock()
  return config


def apply_recipe(config: ml_collections.ConfigDict, skip=()) -> ml_collections.ConfigDict:
  """Sets the keys of config.adapter.method's reference recipe (Method.recipe), except `skip`.

  Example:
    >>> c = apply_recipe(cola.get_config("method=dyndora"))   # already applied by apply_arg
    >>> c.adapter.alpha, c.optim.weight_decay
    (8.0, 0.01)
  """
  recipe = method_registry.get(config.adapter.method).recipe
  with config.unlocked() if config.is_locked else contextlib.nullcontext():
    for path, value in recipe.items():
      if path not in skip:
        set_path(config, path, value)
  return config


def set_path(config, path: str, value) -> None:
  """config['a']['b']['c'] = value for path 'a.b.c' (the config must be unlocked for new keys).

  Example:
    >>> with c.unlocked():
    ...   set_path(c, "optim.lr", 3e-4)
  """
  parent, leaf = _parent(config, path)
  parent[leaf] = value


def _parent(config, path: str):
  *parents, leaf = path.split(".")
  node = config
  for part in parents:
    node = node[part]
  return node, leaf


def run_config(config, record: Mapping[str, Any]) -> tuple[ml_collections.ConfigDict, list[str]]:
  """(config, differences): a copy of `config` carrying every training setting of the stored
  run (`record` from run.json), so only the settings outside the identity (evaluation, logging,
  layout) come from `config`; each difference reads 'key: config value -> run value'. What eval
  does, so that a run's training overrides need not be repeated.

  Example:
    >>> config, diffs = run_config(tiny.get_config(), fingerprint.read("runs/x"))
  """
  out = config.copy_and_resolve_references()
  diffs = []
  with out.unlocked():
    stored_config = record.get("config", {})
    for key, now, stored in fingerprint.differing_keys(fingerprint.identity(config), stored_config):
      if now is fingerprint.MISSING or stored is fingerprint.MISSING:
        continue  # a key one side does not know: `check` names it
      try:
        parent, leaf = _parent(out, key)
        current = parent[leaf]
        parent[leaf] = tuple(stored) if isinstance(current, tuple) else stored
      except (KeyError, TypeError, AttributeError):
        continue
      diffs.append(f"{key}: {json.dumps(now)} -> {json.dumps(stored)}")
  return out, diffs


def resolved(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of `config` with optim.lr filled from optim.lr_by_method when it is unset.

  Example:
    >>> resolved(sst2.get_config("method=lora")).optim.lr     # the table's lora entry
    >>> resolved(sst2.get_config("method=lora,lr=3e-4")).optim.lr
    0.0003
  """
  out = config.copy_and_resolve_references()
  if out.optim.lr is not None:
    return out
  lr = optim.method_lr(out.optim, out.adapter.method)
  if lr is None:
    raise ConfigError(_no_lr_message(out.optim, out.adapter.method))
  with out.unlocked():
    out.optim.lr = float(lr)
  out.lock()
  return out


def _no_lr_message(optim_cfg, method) -> str:
  return (f"optim.lr is unset and optim.lr_by_method has no entry for method {method!r} (it has "
          f"{sorted(optim_cfg.get('lr_by_method', None) or {})}); pass lr=... or add the method "
          "to the config's table.")


def _placeholder_default(parent, leaf):
  """A typed placeholder's type's zero (so '1e-3' parses as a float); None for a plain None."""
  try:
    return parent.get_ref(leaf).get_type()()
  except (ValueError, TypeError):  # a plain None field has no reference, hence no type
    return None


def _parse(value: str, current):
  if value == "None":
    return None
  if isinstance(current, bool):
    return value.lower() in ("1", "true", "yes")
  if isinstance(current, int):
    return int(value)
  if isinstance(current, float):
    return float(value)
  return value


def _none_or(parser_cls, words=("None", "none")):
  """`parser_cls` that also reads `words` as None (ml_collections' own parsers reject 'None')."""

  class NoneOr(parser_cls):

    def parse(self, argument):
      if isinstance(argument, str) and argument.strip() in words:
        return None
      return super().parse(argument)

  NoneOr.__name__ = f"NoneOr{parser_cls.__name__}"
  return NoneOr()


# Documented None values (data.limit, checkpoint.max_to_keep, optim.warmup_ratio, ...) must be
# reachable from `--config.<key>=None`; validate() then rejects None where it is not allowed. A
# str field takes only `None` itself: 'none' is a real value (model.quantize='none').
for _type, _parser in ((int, flags.IntegerParser), (float, flags.FloatParser),
                       (bool, flags.BooleanParser)):
  config_flags.register_flag_parser_for_type(_type, _none_or(_parser))
config_flags.register_flag_parser_for_type(str, _none_or(flags.ArgumentParser, words=("None",)))


# ------------------------------------------------------------------------------ validation

# What experiment.run_experiment runs besides the method: 'zero_shot' scores the causal LM
# without adapters on the same evaluation (the others are classification baselines).
BASELINES = ("majority", "frozen", "linear_probe", "zero_shot")
DTYPES = ("float32", "bfloat16", "float16")


def validate(config, *, with_data: bool = True, with_model: bool = True) -> None:
  """Checks the whole config before any data or model is read; all problems in one error.

  `with_data=False` / `with_model=False` skip the data section / the model's name and files
  (callers that bring their own batches or backbone).

  Example:
    >>> validate(tiny.get_config("lr=-1"))
    ConfigError: invalid config (1 problem; nothing was loaded): optim.lr=-1.0 must be ...

  Raises:
    ConfigError: one line per problem, each naming the key, its value and the fix.
  """
  problems = config_problems(config, with_data=with_data, with_model=with_model)
  if problems:
    head = f"invalid config ({len(problems)} problem{'s' if len(problems) > 1 else ''}; nothing was loaded): "
    raise ConfigError(head + "\n  also: ".join(problems))


def _int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _regex_problem(key, pattern):
  try:
    re.compile(pattern)
  except (re.error, TypeError) as e:
    return f"{key}={pattern!r} is not a valid regex ({e})."
  return None


def config_problems(config, *, with_data: bool = True, with_model: bool = True) -> list[str]:
  """The list behind `validate` (empty when the config is fine)."""
  p = []
  get = config.get

  def need(ok, msg):
    if not ok:
      p.append(msg)

  need(_int(get("seed", 0)) and get("seed", 0) >= 0, f"seed={get('seed')!r} must be an integer >= 0.")
  need(isinstance(get("workdir", ""), str) and get("workdir", ""),
       f"workdir={get('workdir')!r} must be a non-empty folder name.")
  need(get("resume", "auto") in fingerprint.RESUME_MODES,
       f"resume={get('resume')!r} must be one of {', '.join(fingerprint.RESUME_MODES)}.")
  batch, steps = get("batch_size"), get("num_steps", 0)
  need(_int(batch) and batch >= 1, f"batch_size={batch!r} must be an integer >= 1.")
  need(_int(get("eval_batch_size", 1)) and get("eval_batch_size", 1) >= 1,
       f"eval_batch_size={get('eval_batch_size')!r} must be an integer >= 1.")
  need(_int(steps) and steps >= 0, f"num_steps={steps!r} must be an integer >= 1 (or 0: from "
       "num_epochs).")
  need(_number(get("num_epochs", 1.0)) and get("num_epochs", 1.0) > 0,
       f"num_epochs={get('num_epochs')!r} must be a finite number > 0.")
  need(_int(get("log_every", 1)) and get("log_every", 1) >= 1,
       f"log_every={get('log_every')!r} must be an integer >= 1.")
  need(get("progress_bar", None) in (None, True, False),
       f"progress_bar={get('progress_bar')!r} must be True, False or None (auto).")
  ckpt = get("checkpoint", None)
  if ckpt is not None:
    need(_int(ckpt.get("every", 1)) and ckpt.get("every", 1) >= 1,
         f"checkpoint.every={ckpt.get('every')!r} must be an integer >= 1 (steps between saves).")
    keep = ckpt.get("max_to_keep", 1)
    need(keep is None or (_int(keep) and keep >= 1),
         f"checkpoint.max_to_keep={keep!r} must be an integer >= 1 (or None: keep all); 0 would "
         "delete every checkpoint.")
  baselines = tuple(get("baselines", ()) or ())
  bad = [b for b in baselines if b not in BASELINES]
  need(not bad, f"baselines {bad} unknown; choose among {', '.join(BASELINES)}.")
  task = get("model", {}).get("task", None)
  if task is not None:
    wrong = [b for b in baselines if (b == "zero_shot") != (task == "causal_lm")]
    need(not wrong, f"baselines {wrong} do not apply to model.task={task!r}: 'zero_shot' is for "
         "causal_lm, 'majority', 'frozen' and 'linear_probe' for classification.")
  gen = get("generate", None)
  if gen is not None and gen.get("enabled", False):
    need(_int(gen.get("max_new_tokens")) and gen.get("max_new_tokens") >= 1,
         f"generate.max_new_tokens={gen.get('max_new_tokens')!r} must be an integer >= 1.")
  try:
    axes = sharding.parse_mesh(get("mesh", "data:-1"))
    sizes = [s for _, s in axes]
    need(all(s == -1 or s >= 1 for s in sizes) and sizes.count(-1) <= 1,
         f"mesh={get('mesh')!r}: sizes must be >= 1, with at most one -1 (the remaining devices).")
  except (ValueError, TypeError) as e:
    p.append(f"mesh={get('mesh')!r} cannot be parsed ({e}); e.g. 'data:-1,fsdp:1,model:1'.")
  rules = get("sharding_rules", "replicated")
  need(not isinstance(rules, str) or rules in sharding.RULE_NAMES,
       f"sharding_rules={rules!r} unknown; choose {', '.join(sharding.RULE_NAMES)} or a list of "
       "(regex, spec) pairs.")
  need(get("distributed", "auto") in sharding.DISTRIBUTED_MODES,
       f"distributed={get('distributed')!r} must be one of {', '.join(sharding.DISTRIBUTED_MODES)}.")
  p += _model_problems(config.model, with_model)
  adapter_cfg = _adapter_problems(config.adapter, p)
  head = get("head", None)
  if head is not None and _regex_problem("head", head):
    p.append(_regex_problem("head", head))
  freeze = get("freeze", ()) or ()
  if isinstance(freeze, str):
    p.append(f"freeze={freeze!r} must be a list of regexes, not one string; pass ({freeze!r},).")
  else:
    p += [m for m in (_regex_problem("freeze", r) for r in freeze) if m]
  p += _optim_problems(config.optim, batch, steps, config.adapter.get("method"))
  if adapter_cfg is not None:
    method = method_registry.get(adapter_cfg.method)
    p += _quantized_base_problems(config.model.get("quantize", "none"), method, adapter_cfg)
    if method.training is not None:
      # The method's own section (e.g. config.dyndora) is checked by the method itself.
      try:
        method.training(adapter_cfg, get(method.name, None), steps if _int(steps) and steps > 0 else 100)
      except (ValueError, TypeError) as e:
        p.append(f"{method.name}: {e}")
  if with_data:
    if get("data", None) is None:
      p.append("the config has no data section; set config.data = data.default_data_config(...).")
    else:
      p += data.config_problems(config.data, config.model.get("task", None))
      if with_model:
        p += _position_problems(config.model, config.data)
  return p


def model_config(mc) -> dict | None:
  """config.model's transformers config as a dict, with model.config_overrides: the tiny config,
  or the checkpoint's config.json / GGUF metadata (no weights are read). None where it cannot be
  read; loading the model then says why.

  Example:
    >>> model_config(tiny.get_config().model)["max_position_embeddings"]
    64
  """
  overrides = dict(mc.get("config_overrides", None) or {})
  try:
    if mc.get("tiny", ""):
      return {**models.tiny_config(mc.tiny, **overrides).to_dict(), **overrides}
    return {**_checkpoint_config(mc.name), **overrides}
  except (UserError, OSError, ValueError, TypeError, KeyError):
    return None


@functools.lru_cache(maxsize=8)
def _checkpoint_config(name: str) -> dict:
  # Once per process: a GGUF file's metadata takes seconds to read, and a run validates twice.
  return models.read_config(name)


def _position_problems(mc, data_cfg) -> list[str]:
  """data.max_length beyond the positions the model has: an error for learned position tables
  (no row to look up, NaN at the first step), a warning for rotary ones (they extrapolate)."""
  max_length = data_cfg.get("max_length", None)
  if data_cfg.get("source", None) == "tfds_image" or not _int(max_length):
    return []
  cfg = model_config(mc)
  if cfg is None:
    return []
  try:
    family = models.family_of(cfg)
  except ValueError:
    return []   # an unsupported model type: loading the model reports it
  limit = family.max_positions(cfg) if family.max_positions is not None else None
  if limit is None or max_length <= limit:
    return []
  name = f"tiny {mc.tiny}" if mc.get("tiny", "") else mc.get("name")
  if family.learned_positions:
    return [f"data.max_length={max_length} is more than the {limit} positions model "
            f"{name!r} ({family.name}) has learned embeddings for; set data.max_length <= {limit}."]
  logging.warning("data.max_length=%d is more than the %d positions model %r (%s) was trained "
                  "on; its rotary positions extrapolate, usually with some loss of quality.",
                  max_length, limit, name, family.name)
  return []


def _model_problems(mc, with_model: bool) -> list[str]:
  p = []
  task = mc.get("task", None)
  if task not in model_registry.TASKS:
    p.append(f"model.task={task!r} unknown; choose one of {', '.join(model_registry.TASKS)}.")
  for key in ("dtype", "param_dtype"):
    if mc.get(key, "float32") not in DTYPES:
      p.append(f"model.{key}={mc.get(key)!r} unknown; choose one of {', '.join(DTYPES)}.")
  if mc.get("quantize", "none") not in quant.FORMATS:
    p.append(f"model.quantize={mc.get('quantize')!r} unknown; choose one of "
             f"{', '.join(quant.FORMATS)}.")
  labels = mc.get("num_labels", 0)
  if not _int(labels) or labels < 0:
    p.append(f"model.num_labels={labels!r} must be an integer >= 0 (0: from the data).")
  tiny = mc.get("tiny", "")
  if tiny:
    if tiny not in model_registry.names():
      p.append(f"model.tiny={tiny!r} is not a model family; choose one of "
               f"{', '.join(model_registry.names())}.")
    elif task in model_registry.TASKS:
      try:
        model_registry.get(tiny).check_task(task)
      except ValueError as e:
        p.append(f"model.tiny: {e}")
    if task != "image_classification" and not mc.get("tokenizer", ""):
      p.append("a tiny text model needs model.tokenizer (e.g. 'minilm').")
  if with_model:
    for key in ("name", "tokenizer") if not tiny else ("tokenizer",):
      value = mc.get(key, "")
      if key == "name" and not value:
        p.append("model.name is empty; name a checkpoint folder, 'minilm' or a hub name.")
      elif (isinstance(value, str) and value.startswith(("/", "./", "../", "~"))
            and not os.path.isdir(os.path.expanduser(value))):
        p.append(f"model.{key}={value!r} is not a folder; point it at a Hugging Face checkpoint "
                 "folder (config.json + safetensors).")
  return p


def _quantized_base_problems(fmt, method, adapter_cfg) -> list[str]:
  """model.quantize needs a frozen backbone and, with adapters, the factored mode."""
  if fmt == "none" or fmt not in quant.FORMATS:
    return []
  if method.trains_backbone:
    return [f"method {method.name!r} trains the backbone, which a quantised base "
            f"(model.quantize={fmt!r}) cannot be; use an adapter method or model.quantize='none'."]
  if method.has_adapters and adapter_cfg.mode != "factored":
    return [f"model.quantize={fmt!r} needs adapter.mode='factored': the merged mode forms "
            "W' = g ⊙ (W0 + s·A·B) in full precision for every adapted kernel, which defeats the "
            "quantised base."]
  return []


def _adapter_problems(section, p: list[str]):
  """Each adapter field through AdapterConfig's own checks; the AdapterConfig, or None."""
  values = section.to_dict()
  values.pop("transposed", None)  # detected from the model at load time
  known = set(AdapterConfig.__dataclass_fields__)
  unknown = sorted(set(values) - known)
  if unknown:
    p.append(f"unknown adapter key(s) {unknown}; known: {', '.join(sorted(known - {'transposed'}))}.")
    return None
  before = len(p)
  for key, value in values.items():
    try:  # one field at a time, so every bad field is reported, not only the first
      AdapterConfig(**{key: value})
    except (ValueError, TypeError) as e:
      p.append(f"adapter.{key}={value!r}: {e}")
  if len(p) > before:
    return None
  try:
    cfg = AdapterConfig(**values)
  except (ValueError, TypeError) as e:
    p.append(f"adapter: {e}")
    return None
  if not cfg.has_adapters:
    return cfg
  if not _number(cfg.alpha) or cfg.alpha <= 0:
    p.append(f"adapter.alpha={cfg.alpha!r} must be a finite number > 0: the update is scaled by "
             "alpha/rank, so alpha=0 switches the low-rank update off and gives lora_a/lora_b zero "
             "gradients (use method=frozen to train only the head).")
  if _regex_problem("adapter.targets", cfg.targets):
    p.append(_regex_problem("adapter.targets", cfg.targets))
  return cfg


def _optim_problems(oc, batch, steps, method=None) -> list[str]:
  p = []
  if oc.get("name") not in optim.OPTIMIZERS:
    p.append(f"optim.name={oc.get('name')!r} unknown; choose one of {', '.join(optim.OPTIMIZERS)}.")
  if oc.get("schedule", "linear") not in optim.SCHEDULES:
    p.append(f"optim.schedule={oc.get('schedule')!r} unknown; choose one of "
             f"{', '.join(optim.SCHEDULES)}.")
  lr = optim.method_lr(oc, method)
  if lr is None:
    p.append(_no_lr_message(oc, method))
  elif not _number(lr) or lr <= 0:
    name = "optim.lr" if oc.get("lr") is not None else f"optim.lr_by_method[{method!r}]"
    p.append(f"{name}={lr!r} must be a finite number > 0 (e.g. --config.optim.lr=1e-3).")
  ratio = oc.get("warmup_ratio", None)
  if ratio is not None and (not _number(ratio) or not 0 <= ratio < 1):
    p.append(f"optim.warmup_ratio={ratio!r} must lie in [0, 1) (a fraction of num_steps).")
  warmup = oc.get("warmup_steps", 0)
  if not _int(warmup) or warmup < 0:
    p.append(f"optim.warmup_steps={warmup!r} must be an integer >= 0.")
  elif ratio is None and _int(steps) and steps > 0 and warmup > steps:  # a ratio replaces it
    p.append(f"optim.warmup_steps={warmup} is more than num_steps={steps}; the learning rate "
             "would never reach optim.lr. Lower warmup_steps.")
  for key, lo, hi in (("b1", 0.0, 1.0), ("b2", 0.0, 1.0)):
    v = oc.get(key, 0.9)
    if not _number(v) or not lo <= v < hi:
      p.append(f"optim.{key}={v!r} must lie in [0, 1).")
  if not _number(oc.get("eps", 1e-8)) or oc.get("eps", 1e-8) <= 0:
    p.append(f"optim.eps={oc.get('eps')!r} must be a finite number > 0.")
  if not _number(oc.get("weight_decay", 0.0)) or oc.get("weight_decay", 0.0) < 0:
    p.append(f"optim.weight_decay={oc.get('weight_decay')!r} must be a finite number >= 0.")
  clip = oc.get("clip_norm", 0.0)
  if clip is not None and (not _number(clip) or clip < 0):
    p.append(f"optim.clip_norm={clip!r} must be a finite number >= 0 (0: no clipping).")
  accum = oc.get("accum_steps", 1)
  if not _int(accum) or accum < 1:
    p.append(f"optim.accum_steps={accum!r} must be an integer >= 1.")
  elif _int(batch) and batch >= 1 and batch % accum:
    divisors = [d for d in range(1, batch + 1) if batch % d == 0]
    p.append(f"batch_size={batch} does not divide by optim.accum_steps={accum} (each micro-batch "
             f"has batch_size / accum_steps rows); choose accum_steps among {divisors}.")
  return p
