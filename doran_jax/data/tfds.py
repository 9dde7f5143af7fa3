"""Sources 'tfds' (text classification) and 'tfds_image' (image classification, ViT
preprocessing) through `tfds.data_source` (array_record; no TensorFlow, never downloads).

Example:
  >>> src = tfds_source("glue/cola", "validation", data_dir="~/tensorflow_datasets")
"""

from __future__ import annotations

import functools
import importlib
import os
from typing import Optional

import numpy as np

from doran_jax.data.base import Source, checked_max_length, keep, tokenize_texts
from doran_jax.data.dataset import Dataset
from doran_jax.errors import DataError


# Legacy builders (glue, ...) register only when their category package is imported;
# tfds's own lazy import does not do that for data_source.
_TFDS_LEGACY_PACKAGES = ("text", "image_classification", "image")


def tfds_source(name: str, split: str, data_dir: Optional[str] = None):
  """`tfds.data_source(name, split)` that never downloads; clear errors when not prepared.

  Example:
    >>> src = tfds_source("glue/cola", "validation", data_dir="~/tensorflow_datasets")
    >>> len(src), src[0]["sentence"]
  """
  import tensorflow_datasets as tfds
  from tensorflow_datasets.core import registered
  data_dir = os.path.expanduser(data_dir) if data_dir else None
  where = data_dir or "~/tensorflow_datasets (or $TFDS_DATA_DIR)"
  for attempt in range(2):
    try:
      return tfds.data_source(name, split=split, data_dir=data_dir, download=False,
                              try_gcs=False)
    except registered.DatasetNotFoundError as e:
      if attempt:
        raise DataError(f"unknown tensorflow-datasets name {name!r}; check data.name "
                         "(e.g. 'glue/sst2', 'cifar100').") from e
      for pkg in _TFDS_LEGACY_PACKAGES:
        try:
          importlib.import_module(f"tensorflow_datasets.{pkg}")
        except Exception:  # pylint: disable=broad-except
          pass  # a category that needs TensorFlow; its data sets stay unavailable
    except Exception as e:  # pylint: disable=broad-except
      raise DataError(
          f"tfds data set {name!r} (split {split!r}) is not prepared in array_record format in "
          f"data_dir {where}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. "
          f"This loader never downloads. Where you have network, run `tfds build {name} "
          f"--data_dir=DIR --file_format=array_record` (or tfds.data_source({name!r}, "
          "data_dir=DIR) with download allowed), copy DIR here and set data.data_dir.") from e


def _tfds_read(data_cfg, split, name):
  """(records of the kept rows, the source's feature dict)."""
  tfds_name = data_cfg.get("name", None)
  if not tfds_name:
    raise DataError("tfds sources need data.name, e.g. 'glue/sst2' or 'cifar100'.")
  src = tfds_source(tfds_name, name, data_cfg.get("data_dir", None))
  rows = keep(data_cfg, split, len(src))
  records = [src[int(i)] for i in rows]
  return records, src.dataset_info.features


def _labels_info(records, features, label_key):
  if records and label_key not in records[0]:
    raise DataError(f"feature {label_key!r} not in the data set; data.label_key must be one of "
                     f"{sorted(records[0])}.")
  labels = np.asarray([int(r[label_key]) for r in records], np.int32)
  if labels.size and labels.min() < 0:
    raise DataError(f"the split has unlabelled examples (label {labels.min()}), e.g. GLUE's "
                     "test split; choose a labelled split for data.train_split/eval_split.")
  feature = features[label_key] if label_key in features else None
  num_classes = getattr(feature, "num_classes", None) or int(labels.max()) + 1
  names = getattr(feature, "names", None)
  return labels, int(num_classes), (list(names) if names else None)


def _text(value) -> str:
  if isinstance(value, np.ndarray):
    value = value.item()
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _load_text(data_cfg, split, name, ctx) -> Dataset:
  """Only the kept records are read."""
  keys = tuple(data_cfg.get("text_keys", ("sentence",)))
  if len(keys) not in (1, 2):
    raise DataError(f"data.text_keys must name one or two text features, got {keys}.")
  records, features = _tfds_read(data_cfg, split, name)
  for k in keys:
    if records and k not in records[0]:
      raise DataError(f"text feature {k!r} not in the data set; data.text_keys must be among "
                       f"{sorted(records[0])}.")
  labels, num_classes, names = _labels_info(records, features, data_cfg.get("label_key", "label"))
  texts = [_text(r[keys[0]]) for r in records]
  pairs = [_text(r[keys[1]]) for r in records] if len(keys) == 2 else None
  if labels.max() >= num_classes:
    raise DataError(f"label {labels.max()} is out of range for num_classes={num_classes}; set "
                    "data.num_classes to the number of classes.")
  arrays = tokenize_texts(ctx.tokenizer, texts, checked_max_length(data_cfg), pairs=pairs)
  arrays["labels"] = labels
  return Dataset(arrays, num_classes, names, source=f"tfds {data_cfg.get('name', None)}[{name}]")


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
  """(H, W[, C]) uint8 -> (size, size, 3) uint8, bilinear (PIL; antialiased when shrinking).

  Grey and RGBA images become RGB, since ViT takes three channels.

  Example:
    >>> resize_image(np.zeros((32, 32, 3), np.uint8), 224).shape
    (224, 224, 3)
  """
  from PIL import Image
  image = np.asarray(image)
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  if image.dtype != np.uint8:
    raise DataError(f"expected uint8 images, got {image.dtype}; decode the image feature first.")
  pil = Image.fromarray(image).convert("RGB")
  return np.asarray(pil.resize((size, size), Image.BILINEAR), np.uint8)


def normalize_pixels(batch: dict, mean: float, std: float) -> dict:
  """uint8 NCHW pixel_values -> float32 (x / 255 - mean) / std, the family's image processor.

  Example:
    >>> normalize_pixels({"pixel_values": np.full((1, 3, 2, 2), 255, np.uint8)}, 0.5, 0.5)
  """
  out = dict(batch)
  pixels = batch["pixel_values"].astype(np.float32) / 255.0
  out["pixel_values"] = (pixels - mean) / std
  return out


def _load_image(data_cfg, split, name, ctx) -> Dataset:
  image_size = ctx.image_size or data_cfg.get("image_size", None)
  image_norm = ctx.image_norm
  if not isinstance(image_size, int) or image_size <= 0:
    raise DataError(f"tfds_image needs a positive integer image size, got {image_size!r}: pass "
                     "image_size= (the model's config.image_size) or set data.image_size.")
  if image_norm is None or len(image_norm) != 2 or None in image_norm:
    raise DataError(f"tfds_image needs image_norm=(mean, std), the model family's image "
                    f"constants (bb.family.image_mean, bb.family.image_std), got {image_norm!r}; "
                    "is the model an image model?")
  records, features = _tfds_read(data_cfg, split, name)
  key = data_cfg.get("image_key", "image")
  if records and key not in records[0]:
    raise DataError(f"image feature {key!r} not in the data set; data.image_key must be among "
                     f"{sorted(records[0])}.")
  labels, num_classes, names = _labels_info(records, features, data_cfg.get("label_key", "label"))
  # Stored as uint8 NCHW (4x smaller than float32); normalize_pixels runs per batch.
  pixels = np.stack([resize_image(r[key], image_size) for r in records]).transpose(0, 3, 1, 2)
  return Dataset({"pixel_values": np.ascontiguousarray(pixels), "labels": labels}, num_classes,
                 names, transform=functools.partial(normalize_pixels, mean=float(image_norm[0]),
                                                    std=float(image_norm[1])))


def _problems(data_cfg) -> list[str]:
  problems = []
  if not data_cfg.get("name", None):
    problems.append("tfds sources need data.name, e.g. 'glue/sst2' or 'cifar100'.")
  data_dir = data_cfg.get("data_dir", None)
  if data_dir and not os.path.isdir(os.path.expanduser(data_dir)):
    problems.append(f"data.data_dir={data_dir!r} is not a folder; point it at the prepared "
                    "tensorflow_datasets folder.")
  return problems


def _text_problems(data_cfg) -> list[str]:
  problems = _problems(data_cfg)
  if len(tuple(data_cfg.get("text_keys", ("sentence",)))) not in (1, 2):
    problems.append(f"data.text_keys={data_cfg.text_keys!r} must name one or two text features.")
  return problems


TEXT_SOURCE = Source(name="tfds", tasks=("classification",), splits=("train", "validation"),
                     load=_load_text, problems=_text_problems, overrides={"name": "glue/sst2"})
# VTAB-1k style: disjoint train / held-out parts of 'train', 800 training and 200 held-out
# validation images. For the protocol's final numbers train on
# train_split="train[:800]+train[45000:45200]" (cifar100), limit=None, and score
# eval_split="test", eval_limit=None.
IMAGE_SOURCE = Source(name="tfds_image", tasks=("image_classification",),
                      splits=("train[:90%]", "train[90%:]"), load=_load_image,
                      problems=_problems, needs_tokenizer=False,
                      overrides={"name": "cifar100", "limit": 800, "eval_limit": 200})
