"""Moving adapters to and from Hugging Face PEFT adapter folders (LoRA and DoRA).

A PEFT adapter folder holds `adapter_config.json` and `adapter_model.safetensors` with tensors named
after the torch modules, in PyTorch's (out, in) layout:

  base_model.model.<module>.lora_A.weight          (r, in)    = our lora_a.T
  base_model.model.<module>.lora_B.weight          (out, r)   = our lora_b.T
  base_model.model.<module>.lora_magnitude_vector  (out,)     DoRA's m
  base_model.model.<head>.<param>                  modules_to_save (a trained task head)

Our families' module paths are the torch module names with '/' for '.', so
`bert/encoder/layer/0/attention/self/query/kernel` belongs to the torch module
`bert.encoder.layer.0.attention.self.query`. Our kernels are stored (in, out); torch's Linear
weight is (out, in) and GPT-2's Conv1D weight (in, out) (the family's `no_transpose`). PEFT's
lora_A / lora_B have the same layout for Linear and Conv1D; `fan_in_fan_out` only tells PEFT that
the base weight of a Conv1D is stored (in, out), so it follows from `no_transpose`, not from ours.
Kernels listed in `AdapterConfig.transposed` (trees that still store some kernels (out, in)) are
handled too.

Export per method (every export reproduces our `apply_adapters(..., train=False)` weights):
  lora, dora  as themselves.
  doran       as a PEFT DoRA adapter: the hypernetwork's A and B are materialised and τ is folded
              into the magnitude, m' = m·n/(n + τ) (PEFT divides by the plain norm n of V).
  dyndora     as LoRA with only the live components (gate != 0), the gate folded into B; layers of
              different live rank get PEFT's `rank_pattern` / `alpha_pattern`, and a layer with no
              live component (it equals W0) is left out.

Example:
  >>> save_peft_adapter("out/peft", params, adapters, cfg, base_model_name_or_path="out/base",
  ...                   task_type="causal_lm", no_transpose=bb.family.no_transpose)
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from doran_jax import files, paths, quant
from doran_jax.adapters import core
from doran_jax.adapters import method as method_registry
from doran_jax.adapters.config import AdapterConfig
from doran_jax.errors import CheckpointError, UserError
from doran_jax.files import check_output_folder, inside, replacing, write_json
from doran_jax.models import hf_io
from doran_jax.targets import SEP, find_targets, flatten, unflatten

PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
# Our task names -> PEFT's task_type (None: a plain PeftModel, e.g. for image classification).
TASK_TYPES = {"classification": "SEQ_CLS", "causal_lm": "CAUSAL_LM", "image_classification": None}
PEFT_TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS",
                   "FEATURE_EXTRACTION")
# Modules that PEFT's task classes add to modules_to_save on their own.
_AUTO_SAVED = {"SEQ_CLS": ["classifier", "score"], "TOKEN_CLS": ["classifier", "score"]}
_A, _B, _M = ".lora_A.weight", ".lora_B.weight", ".lora_magnitude_vector"
# PEFT options that change the forward pass in ways our adapters cannot represent.
_UNSUPPORTED_OPTIONS = ("lora_bias", "layer_replication", "target_parameters", "use_qalora",
                        "alora_invocation_tokens", "trainable_token_indices", "use_bdlora")
# These inits rewrite the base weights; their saved adapter only fits the rewritten base model.
_BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


def torch_module_name(module_path: str, torch_modules: Sequence[tuple[str, str]] = ()) -> str:
  """Our module path -> torch module name.

  `torch_modules` is the family's `torch_modules` (`bb.family.torch_modules`): the modules
  transformers renames when it builds the torch model (ViT in transformers 5).

  Example:
    >>> torch_module_name("bert/encoder/layer/0/attention/self/query")
    'bert.encoder.layer.0.attention.self.query'
    >>> torch_module_name("vit/encoder/layer/0/output/dense", vit_backbone.family.torch_modules)
    'vit.layers.0.mlp.fc2'
  """
  return _rename(module_path.replace(SEP, "."), torch_modules, 0, 1)


def flax_module_path(module_name: str, torch_modules: Sequence[tuple[str, str]] = ()) -> str:
  """Torch module name -> our module path (the inverse of `torch_module_name`)."""
  return _rename(module_name, torch_modules, 1, 0).replace(".", SEP)


def _rename(name: str, templates: Sequence[tuple[str, str]], src: int, dst: int) -> str:
  """Maps a module name through the first (checkpoint, torch) template pair that matches it."""
  for pair in templates:
    m = re.fullmatch(re.escape(pair[src]).replace(r"\*", r"(\d+)"), name)
    if m:
      out = pair[dst]
      for index in m.groups():
        out = out.replace("*", index, 1)
      return out
  return name


def _rename_tensor(name: str, templates, src: int, dst: int) -> str:
  module, _, param = name.rpartition(".")
  return _rename(module, templates, src, dst) + "." + param if module else name


# ------------------------------------------------------------------------------------------ export


def peft_tensors(params: Mapping[str, Any], adapters: Mapping[str, Any], cfg: AdapterConfig, *,
                 modules_to_save: Sequence[str] = (), no_transpose: str = r"",
                 torch_modules: Sequence[tuple[str, str]] = ()) -> tuple[dict[str, np.ndarray], dict]:
  """The PEFT state dict (float32 numpy, torch layout) and the LoRA config fields of an adapter.

  Example:
    >>> tensors, fields = peft_tensors(params, adapters, cfg)
    >>> tensors["base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight"].shape
    (8, 384)

  Args:
    params: the backbone params (W0, and the trained head when `modules_to_save` names it).
    adapters: the adapter tree of `cfg`.
    cfg: its AdapterConfig (method lora, dora, doran or dyndora).
    modules_to_save: module paths saved whole (e.g. ('classifier',)), PEFT's modules_to_save.
    no_transpose: regex of the kernels torch stores (in, out), `bb.family.no_transpose` (GPT-2's
      Conv1D); fan_in_fan_out is set when every exported target matches it.
    torch_modules: `bb.family.torch_modules`, the modules transformers renames (ViT).

  Returns:
    (tensors, fields): fields holds r, lora_alpha, use_dora, use_rslora, fan_in_fan_out,
    target_modules, rank_pattern, alpha_pattern, lora_dropout and modules_to_save.
  """
  method = method_registry.get(cfg.method)
  if method.peft_factors is None:
    exportable = [m for m in method_registry.names() if method_registry.get(m).peft_factors]
    raise ValueError(f"method {cfg.method!r} has no adapter to export to PEFT; export the model "
                     f"itself (save_pretrained). Exportable methods: {', '.join(exportable)}.")
  flat = flatten(params)
  tensors, ranks, modules, conv1d = {}, {}, [], []
  for t, leaves, a_IxR, b_RxO in core.target_factors(params, adapters, cfg):
    if not t.path.endswith(SEP + "kernel"):
      raise ValueError(f"target {t.path!r} is not a Dense/Conv1D 'kernel'; PEFT export supports "
                       "linear kernels only. Narrow adapter.targets to end with '/kernel'.")
    # A quantised base: PEFT's magnitude is taken against the dequantised W0 we trained on.
    w0 = quant.as_array(flat[t.path], jnp.float32)
    try:
      a_IxR, b_RxO, m_O = method.peft_factors(w0.T if t.transposed else w0, leaves, a_IxR, b_RxO,
                                              cfg)
    except ValueError as e:
      raise ValueError(f"{t.path!r}: {e}") from e
    if a_IxR.shape[1] == 0:
      continue  # dyndora: no live component, the layer is W0 and PEFT need not touch it.
    name = torch_module_name(t.module_path, torch_modules)
    tensors[PREFIX + name + _A] = np.ascontiguousarray(a_IxR.T)
    tensors[PREFIX + name + _B] = np.ascontiguousarray(b_RxO.T)
    if m_O is not None:
      tensors[PREFIX + name + _M] = m_O
    ranks[name] = a_IxR.shape[1]
    modules.append(name)
    conv1d.append(_is_conv1d(t.path, no_transpose))
  if not modules:
    raise ValueError("every targeted layer has zero live components (all dyndora gates are 0): "
                     "the adapter is the identity, there is nothing to export to PEFT.")
  saved = []
  for module_path in modules_to_save:
    tensors.update(_module_tensors(flat, module_path, no_transpose, cfg.transposed, torch_modules))
    saved.append(torch_module_name(module_path, torch_modules))
  # One flag for the whole adapter; PEFT corrects it per layer (with a warning) on a mix.
  fields = _lora_fields(cfg, ranks, all(conv1d))
  fields["target_modules"] = sorted(modules)
  fields["modules_to_save"] = saved or None
  return tensors, fields


def _lora_fields(cfg: AdapterConfig, ranks: Mapping[str, int], fan_in_fan_out: bool) -> dict:
  fields = {"fan_in_fan_out": fan_in_fan_out, "lora_dropout": cfg.dropout, "rank_pattern": {},
            "alpha_pattern": {}}
  fields.update(method_registry.get(cfg.method).peft_fields(cfg, ranks))
  return fields


def _is_conv1d(path: str, no_transpose: str) -> bool:
  """Whether torch stores this kernel (in, out) like ours (GPT-2's Conv1D)."""
  return bool(no_transpose) and re.fullmatch(no_transpose, path) is not None


def _module_tensors(flat: Mapping[str, Any], module_path: str, no_transpose: str,
                    transposed: Sequence[str], torch_modules=()) -> dict[str, np.ndarray]:
  prefix = module_path.rstrip(SEP) + SEP
  leaves = {p: np.asarray(v, np.float32) for p, v in flat.items() if p.startswith(prefix)}
  if not leaves:
    raise ValueError(f"modules_to_save entry {module_path!r} is not a module of the params; give "
                     f"module paths such as 'classifier'. Top-level keys: {_top_keys(flat)}")
  # The naming rule assumes (in, out) kernels: flip any kept (out, in) first.
  leaves = {p: v.T if p in transposed and v.ndim == 2 else v for p, v in leaves.items()}
  state = hf_io.to_torch_names(unflatten(leaves), no_transpose=no_transpose)
  return {PREFIX + _rename_tensor(name, torch_modules, 0, 1): np.ascontiguousarray(v)
          for name, v in state.items()}


def _top_keys(flat) -> list[str]:
  return sorted({p.split(SEP, 1)[0] for p in flat})


def save_peft_adapter(path, params: Mapping[str, Any], adapters: Mapping[str, Any],
                      cfg: AdapterConfig, *, base_model_name_or_path: str,
                      task_type: Optional[str] = None,
                      modules_to_save: Sequence[str] = (), no_transpose: str = r"",
                      torch_modules: Sequence[tuple[str, str]] = (),
                      overwrite: bool = False) -> str:
  """Writes a PEFT LoRA/DoRA adapter folder that `PeftModel.from_pretrained` loads.

  Example:
    >>> models.save_pretrained(bb, bb.params, "export/base")   # the base PEFT wraps
    >>> save_peft_adapter("export/peft", params, adapters, cfg,
    ...                   base_model_name_or_path="export/base", task_type="classification",
    ...                   modules_to_save=("classifier",), no_transpose=bb.family.no_transpose,
    ...                   torch_modules=bb.family.torch_modules)
    >>> # torch: PeftModel.from_pretrained(
    >>> #     AutoModelForSequenceClassification.from_pretrained("export/base"), "export/peft")

  Args:
    path: the folder to write (created if needed); never one holding doran_jax's own export
      (checkpoint.export_adapters), whose adapter_config.json has the same name, nor a symlink:
      an error. An existing folder must be empty unless `overwrite`.
    params: backbone params; with the trained head when `modules_to_save` names it.
    adapters, cfg: the adapter tree and its config (lora, dora, doran or dyndora).
    base_model_name_or_path: recorded in adapter_config.json for PEFT to find the base model.
    task_type: PEFT's task type ('SEQ_CLS', 'CAUSAL_LM', ...) or ours ('classification',
      'causal_lm', 'image_classification'); None for a plain PeftModel. PEFT's SEQ_CLS and
      TOKEN_CLS wrap 'classifier' and 'score' as modules_to_save and need their weights, so the
      head found under those names in `params` is always saved for them.
    modules_to_save: module paths (e.g. ('classifier',)) whose params are saved whole.
    no_transpose: `bb.family.no_transpose`, the kernels torch stores (in, out): GPT-2 needs it
      for fan_in_fan_out and for the layout of Conv1D kernels in modules_to_save.
    torch_modules: `bb.family.torch_modules`: ViT needs it, since transformers 5 renames its
      modules when it builds the torch model and PEFT would otherwise find none of the targets.
    overwrite: replace the files of a non-empty folder (another PEFT adapter, say).

  Returns:
    `path`.
  """
  if is_doran_export(path):
    # Both formats name their config adapter_config.json: writing here would destroy ours.
    raise UserError(f"{os.fspath(path)!r} holds a doran_jax adapter export whose {CONFIG_NAME} a "
                    "PEFT export would overwrite; write the PEFT folder elsewhere, e.g. "
                    f"{os.path.join(os.path.dirname(os.fspath(path).rstrip(os.sep)) or '.', 'peft')!r}.")
  path = check_output_folder(path, overwrite=overwrite, what="save_peft_adapter target")
  if isinstance(base_model_name_or_path, os.PathLike):
    base_model_name_or_path = os.fspath(base_model_name_or_path)
  if not base_model_name_or_path or not isinstance(base_model_name_or_path, str):
    raise ValueError(f"base_model_name_or_path must be a hub name or folder of the base model, got "
                     f"{base_model_name_or_path!r}.")
  peft_task = _peft_task_type(task_type)
  # PEFT's task classes wrap their head (e.g. 'classifier') as modules_to_save and refuse to load
  # an adapter file without its weights, so the head in `params` always goes along.
  modules_to_save = list(modules_to_save)
  for module_path in _head_modules(params, _AUTO_SAVED.get(peft_task, [])):
    if module_path not in modules_to_save:
      modules_to_save.append(module_path)
  tensors, fields = peft_tensors(params, adapters, cfg, modules_to_save=modules_to_save,
                                 no_transpose=no_transpose, torch_modules=torch_modules)
  # PEFT never puts LoRA inside a modules_to_save module: such a target would be dropped silently.
  saved = (fields["modules_to_save"] or []) + _AUTO_SAVED.get(peft_task, [])
  shadowed = [n for n in fields["target_modules"]
              if any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", n) for m in saved)]
  if shadowed:
    raise ValueError(
        f"targets {shadowed} lie inside modules PEFT saves whole ({saved}, "
        f"task_type={peft_task!r}) and PEFT would ignore their adapters; leave the head out of "
        "adapter.targets (pass it as modules_to_save) or export with task_type=None.")
  config = {
      "peft_type": "LORA", "task_type": peft_task,
      "base_model_name_or_path": base_model_name_or_path, "revision": None,
      "bias": "none", "lora_bias": False, "init_lora_weights": True, "inference_mode": True,
      **fields,
  }
  paths.makedirs(path)
  from safetensors.numpy import save_file
  # Our own config rides along in the metadata (string -> string), out of PEFT's way.
  with replacing(paths.join(path, WEIGHTS_NAME)) as tmp:
    save_file(tensors, tmp, metadata={"format": "pt", "doran_jax_config": cfg.to_json()})
  write_json(paths.join(path, CONFIG_NAME), config, indent=2, sort_keys=True)
  return path


def is_doran_export(path) -> bool:
  """True when `path` holds doran_jax's own adapter export (checkpoint.export_adapters)."""
  path = os.fspath(path)
  if paths.isfile(paths.join(path, "adapters.msgpack")):
    return True
  try:
    # A symlink out of the folder is not read here; the loaders refuse it with a clear error.
    record = json.loads(paths.read_bytes(inside(path, CONFIG_NAME)))
  except (OSError, ValueError):
    return False
  return isinstance(record, dict) and "adapter" in record and "peft_type" not in record


def _head_modules(params: Mapping[str, Any], names: Sequence[str]) -> list[str]:
  """The outermost module paths whose last component is one of `names`."""
  found = []
  for path in sorted(flatten(params)):
    parts = path.split(SEP)[:-1]
    for i, part in enumerate(parts):
      if part in names:
        module_path = SEP.join(parts[:i + 1])
        if module_path not in found:
          found.append(module_path)
        break
  return found


def _peft_task_type(task_type: Optional[str]) -> Optional[str]:
  if task_type is None or task_type in PEFT_TASK_TYPES:
    return task_type
  if task_type in TASK_TYPES:
    return TASK_TYPES[task_type]
  raise ValueError(f"unknown task_type {task_type!r}; use one of PEFT's "
                   f"{', '.join(PEFT_TASK_TYPES)}, one of ours ({', '.join(TASK_TYPES)}) or None.")


# ------------------------------------------------------------------------------------------ import


def read_peft_adapter(path: str) -> tuple[dict, dict[str, np.ndarray]]:
  """(adapter_config.json as a dict, tensors) of a PEFT adapter folder; floating tensors as
  float32, others as stored.

  Both files must resolve inside `path` (`files.inside`): a symlink out is a CheckpointError.
  So is a LoRA factor stored as an integer, a NaN/inf tensor, or an r, lora_alpha or
  rank_pattern/alpha_pattern value that is not a finite number > 0.
  """
  config, readers = _open_adapter(path)
  tensors = {k: hf_io.cast(r(), np.float32) for k, r in readers.items()}
  files.check_finite(tensors, source=f"PEFT adapter {os.fspath(path)!r}", fix=_RESAVE)
  return config, tensors


_RESAVE = ("Fix or re-save the adapter (PEFT's save_pretrained, or "
           "doran_jax.peft_io.save_peft_adapter); retrain it if its weights diverged.")


def _open_adapter(path) -> tuple[dict, dict]:
  """(config, {tensor name: hf_io reader}) of a PEFT folder: the config read and its numbers
  checked, the tensors' headers read (no data), every LoRA factor's stored dtype a float."""
  path = os.fspath(path)
  config_file = inside(path, CONFIG_NAME)
  weights_file = inside(path, WEIGHTS_NAME)
  if is_doran_export(path):
    raise UserError(f"{path!r} is a doran_jax adapter export (adapters.msgpack + our "
                     f"{CONFIG_NAME}), not a PEFT folder; load it with "
                     "doran_jax.checkpoint.load_adapters(path), or evaluate it with "
                     "eval.py --adapters <path>.")
  if not paths.isfile(config_file):
    raise ValueError(f"{path!r} is not a PEFT adapter folder: {CONFIG_NAME} is missing.")
  if not paths.isfile(weights_file):
    raise ValueError(f"{path!r} has no {WEIGHTS_NAME}; re-save the adapter with PEFT's "
                     "save_pretrained(..., safe_serialization=True).")
  try:
    config = json.loads(paths.read_bytes(config_file).decode("utf-8"))
  except (ValueError, UnicodeDecodeError) as e:
    raise CheckpointError(f"{CONFIG_NAME} in {path!r} is not valid JSON ({e}). {_RESAVE}") from None
  if not isinstance(config, dict):
    raise CheckpointError(f"{CONFIG_NAME} in {path!r} is not a JSON object. {_RESAVE}")
  # json reads NaN and Infinity; PEFT would scale every layer by them.
  source = f"{CONFIG_NAME} in {path!r}"
  files.check_positive(config, ("r", "lora_alpha"), integer=("r",), source=source, fix=_RESAVE)
  for key in ("rank_pattern", "alpha_pattern"):
    pattern = config.get(key) or {}
    if not isinstance(pattern, dict):
      raise CheckpointError(f"{source}: {key} is {pattern!r}, not a mapping of module patterns "
                            f"to numbers. {_RESAVE}")
    files.check_positive(pattern, list(pattern), source=f"{source}, {key}", fix=_RESAVE,
                         integer=list(pattern) if key == "rank_pattern" else ())
  readers = hf_io.lazy_file(weights_file)
  for name, r in readers.items():
    kind = _factor_kind(name)
    if kind is not None:
      # From the header: an integer LoRA factor is refused before its data is read.
      hf_io.check_tensor(name, kind.strip("."), r.shape, r.is_float, r.header_dtype,
                         jax.ShapeDtypeStruct(r.shape, jnp.float32))
  return config, readers


def _factor_kind(key: str) -> Optional[str]:
  """_A, _B or _M for a LoRA factor's tensor name, None for anything else."""
  if key.endswith(_M + ".weight"):
    return _M  # older PEFT releases kept the parameter's own name
  return next((s for s in (_A, _B, _M) if key.endswith(s)), None)


def load_peft_adapter(path: str, params: Mapping[str, Any], *,
                      transposed: Optional[Sequence[str]] = (),
                      torch_modules: Sequence[tuple[str, str]] = ()) -> tuple[dict, AdapterConfig]:
  """Imports a PEFT LoRA or DoRA adapter folder as (adapters, AdapterConfig) for `params`.

  Example:
    >>> adapters, cfg = load_peft_adapter("peft_out", bb.params)
    >>> logits = bb.apply(apply_adapters(bb.params, adapters, cfg), batch)

  Layers of different rank (PEFT's rank_pattern) are padded with zero components to the largest
  rank, and any per-layer scale (alpha_pattern, rslora) that differs from the config's is folded
  into lora_b, so the imported tree reproduces PEFT's weights exactly. modules_to_save tensors are
  not adapters: read them with `load_peft_modules_to_save`.

  Args:
    path: the adapter folder (adapter_config.json + adapter_model.safetensors).
    params: the backbone params the adapter was made for.
    transposed: paths of kernels that `params` stores (out, in), for trees other than our
      families' (those store every kernel (in, out), GPT-2's Conv1D too: fan_in_fan_out only
      describes torch's base weight and changes nothing here).
    torch_modules: `bb.family.torch_modules`, the modules transformers renames (ViT).

  Raises:
    ValueError: not a LoRA adapter, an option we cannot represent, or a module the params do
      not have.
    CheckpointError (a ValueError): a tensor whose header shape or dtype does not fit the params
      (checked before any data is read), a NaN/inf tensor, or an r / lora_alpha that is not a
      finite number > 0.
  """
  config, readers = _open_adapter(path)
  _check_config(config, path)
  flat = flatten(params)
  factors = _group_tensors(readers, config, path)
  use_dora = bool(config.get("use_dora", False))
  kernels = {}
  for name in sorted(factors):
    kernel = flax_module_path(name, torch_modules) + SEP + "kernel"
    if kernel not in flat or np.ndim(flat[kernel]) != 2:
      raise ValueError(
          f"PEFT module {name!r} has no 2-D kernel {kernel!r} in these params; was the adapter "
          f"made for another model? Top-level keys of the params: {_top_keys(flat)}")
    kernels[name] = kernel
  transposed = tuple(sorted(transposed or ()))
  regex = _targets_regex(flat, kernels.values())
  targets = {t.path: t for t in find_targets(params, regex, transposed)}
  # Every factor's header against its kernel before any data is read.
  for name, f in factors.items():
    _check_factors(name, f, targets[kernels[name]], use_dora)
  tensors = {r.name: hf_io.cast(r(), np.float32) for f in factors.values() for r in f.values()}
  files.check_finite(tensors, source=f"PEFT adapter {os.fspath(path)!r}", fix=_RESAVE)
  factors = {name: {k: tensors[r.name] for k, r in f.items()} for name, f in factors.items()}
  r_max = max(f[_A].shape[0] for f in factors.values())
  cfg = AdapterConfig(method="dora" if use_dora else "lora", rank=r_max,
                      alpha=float(config.get("lora_alpha", 8)), targets=regex,
                      rslora=bool(config.get("use_rslora", False)),
                      dropout=float(config.get("lora_dropout", 0.0) or 0.0), transposed=transposed)
  leaves = {}
  for name, f in factors.items():
    t = targets[kernels[name]]
    a_RxI, b_OxR = f[_A], f[_B]
    r_l = a_RxI.shape[0]
    a_IxR = np.zeros((t.d_in, r_max), np.float32)
    b_RxO = np.zeros((r_max, t.d_out), np.float32)
    a_IxR[:, :r_l] = a_RxI.T
    b_RxO[:r_l] = b_OxR.T * (_peft_scale(config, name, r_l) / cfg.scale)
    leaves[t.module_path + SEP + "lora_a"] = jnp.asarray(a_IxR)
    leaves[t.module_path + SEP + "lora_b"] = jnp.asarray(b_RxO)
    if use_dora:
      leaves[t.module_path + SEP + "magnitude"] = jnp.asarray(f[_M].reshape(-1))
  adapters = {"targets": unflatten(leaves)}
  core.targets_for(params, cfg)  # validates rank <= min(in, out) with a clear message
  return adapters, cfg


def _check_config(config: Mapping[str, Any], path: str) -> None:
  peft_type = config.get("peft_type")
  if peft_type != "LORA":
    raise ValueError(f"{path!r} holds a PEFT {peft_type!r} adapter; only LORA adapters (LoRA or "
                     "DoRA, use_dora=true) can be imported.")
  bad = [k for k in _UNSUPPORTED_OPTIONS if config.get(k)]
  if config.get("bias", "none") != "none":
    bad.append(f"bias={config['bias']!r}")
  if bad:
    raise ValueError(f"PEFT adapter {path!r} uses {bad}, which doran_jax adapters cannot "
                     "represent; re-train it without them or merge it in PEFT "
                     "(merge_and_unload) instead.")
  init = str(config.get("init_lora_weights", True)).lower()
  if init.startswith(_BASE_REWRITING_INITS):
    raise ValueError(
        f"PEFT adapter {path!r} was saved with init_lora_weights={config['init_lora_weights']!r}, "
        "which rewrites the base weights; save it with PEFT's "
        "path_initial_model_for_weight_conversion so it applies to the original base model.")


def _group_tensors(tensors, config, path) -> dict[str, dict[str, np.ndarray]]:
  """{torch module name: {_A, _B[, _M]: tensor}}; modules_to_save tensors are skipped."""
  saved = config.get("modules_to_save") or []
  use_dora = bool(config.get("use_dora", False))
  factors = {}
  for key, value in tensors.items():
    name = key[len(PREFIX):] if key.startswith(PREFIX) else key
    kind = _factor_kind(name)
    if name.endswith(_M + ".weight"):
      name = name[:-len(".weight")]
    if kind is None:
      if any(re.match(rf"(^|.*\.){re.escape(m)}\.", name) for m in saved):
        continue
      raise ValueError(f"PEFT tensor {key!r} in {path!r} is neither lora_A/lora_B/"
                       "lora_magnitude_vector nor part of modules_to_save; doran_jax imports "
                       "linear LoRA/DoRA layers only (no embedding LoRA, biases or tokens).")
    factors.setdefault(name[:-len(kind)], {})[kind] = value
  if not factors:
    raise ValueError(f"PEFT adapter {path!r} has no lora_A/lora_B tensors.")
  for name, f in factors.items():
    want = {_A, _B, _M} if use_dora else {_A, _B}
    if set(f) != want:
      raise ValueError(f"PEFT module {name!r} has {sorted(k.lstrip('.') for k in f)} but "
                       f"use_dora={use_dora} needs {sorted(k.lstrip('.') for k in want)}.")
  return factors


def _check_factors(name: str, f, t, use_dora: bool) -> None:
  """The header shapes of one module's lora_A (r, in), lora_B (out, r) and magnitude (out,)
  against its kernel `t` (a CheckpointError naming the tensor), before their data is read."""
  r_l = f[_A].shape[0] if f[_A].shape else 0
  want = {_A: (r_l, t.d_in), _B: (t.d_out, r_l)}
  if use_dora:
    want[_M] = (t.d_out,)
  for kind, shape in want.items():
    r = f[kind]
    # PEFT's magnitude is (out,); a (1, out)-shaped one is the same vector.
    have = ((int(np.prod(r.shape)),) if kind == _M and len(r.shape) == 2 and 1 in r.shape
            else r.shape)
    try:
      hf_io.check_tensor(r.name, t.module_path + SEP + kind.strip("."), have, r.is_float,
                         r.header_dtype, jax.ShapeDtypeStruct(shape, jnp.float32))
    except CheckpointError as e:
      raise CheckpointError(
          f"{e} PEFT module {name!r} needs ({r_l}, {t.d_in}) and ({t.d_out}, {r_l}) for lora_A "
          f"and lora_B, as the kernel {t.path!r} has in={t.d_in}, out={t.d_out}. Wrong model? "
          "Kernels stored (out, in) must be listed in transposed=.") from None


def _peft_scale(config: Mapping[str, Any], name: str, r_l: int) -> float:
  """PEFT's scaling of one module: alpha_l / r_l (alpha_l / sqrt(r_l) with rslora)."""
  alpha = config.get("lora_alpha", 8)
  for pattern, value in (config.get("alpha_pattern") or {}).items():
    if re.match(rf"(.*\.)?({pattern})$", name):  # PEFT's get_pattern_key
      alpha = value
      break
  return alpha / (math.sqrt(r_l) if config.get("use_rslora") else r_l)


def _targets_regex(flat: Mapping[str, Any], kernels) -> str:
  """The shortest '.*/(a|b)/kernel'-style regex matching exactly `kernels` among the 2-D leaves."""
  kernels = set(kernels)
  candidates = {p for p, v in flat.items() if np.ndim(v) == 2}
  depth = max(len(k.split(SEP)) for k in kernels) - 1
  for n in range(1, depth):
    names = sorted({SEP.join(k.split(SEP)[-1 - n:-1]) for k in kernels})
    group = re.escape(names[0]) if len(names) == 1 else "(" + "|".join(map(re.escape, names)) + ")"
    pattern = rf".*/{group}/kernel"
    if {p for p in candidates if re.fullmatch(pattern, p)} == kernels:
      return pattern
  return "(" + "|".join(re.escape(k) for k in sorted(kernels)) + ")"


def load_peft_modules_to_save(path: str, params: Mapping[str, Any], *, no_transpose: str = r"",
                              transposed: Sequence[str] = (),
                              torch_modules: Sequence[tuple[str, str]] = ()) -> dict:
  """`params` with the modules a PEFT folder saved whole (modules_to_save, e.g. the task head).

  Example:
    >>> params = load_peft_modules_to_save("peft_out", bb.params,
    ...                                    no_transpose=bb.family.no_transpose)

  Args:
    path: the adapter folder.
    params: the backbone params to update.
    no_transpose: `bb.family.no_transpose`, the kernels torch stores (in, out) (GPT-2's Conv1D).
    transposed: kernels that `params` stores (out, in), as in `load_peft_adapter`.
    torch_modules: `bb.family.torch_modules`, the modules transformers renames (ViT).
  """
  config, tensors = read_peft_adapter(path)
  saved = config.get("modules_to_save") or []
  flat = flatten(params)
  ours = {hf_io.torch_name(p): p for p in flat}
  state = {}
  for key, value in tensors.items():
    name = key[len(PREFIX):] if key.startswith(PREFIX) else key
    if not any(re.match(rf"(^|.*\.){re.escape(m)}\.", name) for m in saved):
      continue
    name = _rename_tensor(name, torch_modules, 1, 0)
    if name not in ours:
      raise ValueError(f"PEFT tensor {key!r} (modules_to_save) has no counterpart "
                       f"{flax_module_path(name)!r} in the params; was it saved for another model?")
    # The naming rule yields (in, out) kernels: pre-flip those `params` keeps (out, in).
    state[name] = value.T if ours[name] in transposed and value.ndim == 2 else value
  want = unflatten({ours[n]: flat[ours[n]] for n in state})
  try:
    loaded, _, _ = hf_io.to_flax(state, want, no_transpose=no_transpose)
  except ValueError as e:
    raise ValueError(f"PEFT modules_to_save in {path!r} do not fit the params: {e}") from e
  for p, value in flatten(loaded).items():
    flat[p] = jnp.asarray(value, jnp.asarray(flat[p]).dtype)
  return unflatten(flat)
