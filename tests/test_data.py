"""doran_jax.data: real chatterbot and TSV data, tfds under mock_data, step-addressed batches."""

import collections

import numpy as np
import pytest

from doran_jax import data, models
from doran_jax.models import registry


@pytest.fixture(scope="module")
def tokenizer():
  import transformers
  return transformers.AutoTokenizer.from_pretrained(models.minilm_path())


def _toy(n=10, **extra):
  arrays = {"x": np.arange(n), "labels": np.arange(n, dtype=np.int32) % 3}
  arrays.update(extra)
  return data.Dataset(arrays, 3, None)


# ------------------------------------------------------------------------------ chatterbot


def test_chatterbot_real_topics_split_and_determinism(tokenizer):
  cfg = data.default_data_config("chatterbot", max_length=32)
  texts, labels, names = data.chatterbot_examples(min_examples=cfg.min_examples)
  counts = collections.Counter(labels)
  assert len(names) >= 5 and names == sorted(set(names))
  assert min(counts.values()) >= cfg.min_examples
  keys = [t.lower() for t in texts]
  assert len(set(keys)) == len(keys) and min(len(k) for k in keys) >= 3

  train_texts, train_labels, _ = data._chatterbot_split(cfg, "train")
  eval_texts, eval_labels, _ = data._chatterbot_split(cfg, "eval")
  assert not set(train_texts) & set(eval_texts)
  assert len(train_texts) + len(eval_texts) == len(texts)
  for c, n in counts.items():  # stratified: every topic in eval at ~eval_fraction
    assert abs(eval_labels.count(c) - cfg.eval_fraction * n) <= 1

  train = data.load_dataset(cfg, "train", tokenizer=tokenizer)
  again = data.load_dataset(cfg, "train", tokenizer=tokenizer)
  evals = data.load_dataset(cfg, "eval", tokenizer=tokenizer)
  assert train.num_classes == evals.num_classes == len(names)
  assert train.label_names == names
  np.testing.assert_array_equal(train.arrays["input_ids"], again.arrays["input_ids"])
  np.testing.assert_array_equal(train.arrays["labels"], np.asarray(train_labels))
  assert train.arrays["input_ids"].shape == (len(train_texts), 32)
  assert {k: v.dtype for k, v in train.arrays.items()} == {
      "input_ids": np.int32, "attention_mask": np.int32, "token_type_ids": np.int32,
      "labels": np.int32}
  # A different split seed moves examples between train and eval.
  reseeded = data.default_data_config("chatterbot", split_seed=1)
  other, _, _ = data._chatterbot_split(reseeded, "train")
  assert set(other) != set(train_texts)


# ------------------------------------------------------------------------------------- tsv


@pytest.mark.parametrize("fmt,sizes", [("sst2", (6920, 1821)), ("cola", (8551, 516))])
def test_tsv_real_files_column_order(shared_data, tokenizer, fmt, sizes):
  path = shared_data / "text" / fmt
  cfg = data.default_data_config("tsv", path=str(path), format=fmt, max_length=48)
  train = data.load_dataset(cfg, "train", tokenizer=tokenizer)
  dev = data.load_dataset(cfg, "eval", tokenizer=tokenizer)
  assert (len(train), len(dev)) == sizes
  assert train.num_classes == 2 and train.label_names == data.TSV_LABEL_NAMES[fmt]
  for ds in (train, dev):
    assert set(np.unique(ds.arrays["labels"])) == {0, 1}
  # The sentence column was tokenized, not the label column.
  first = (path / "train.tsv").read_text(encoding="utf-8").splitlines()[0].split("\t")
  sentence, label = (first[1], first[0]) if fmt == "sst2" else (first[0], first[1])
  expected = tokenizer(sentence, add_special_tokens=False)["input_ids"][:5]
  assert list(train.arrays["input_ids"][0][1:6]) == expected     # after [CLS]
  assert train.arrays["labels"][0] == int(label)


def test_tsv_wrong_format_and_missing_path(shared_data, tokenizer):
  cfg = data.default_data_config("tsv", path=str(shared_data / "text" / "sst2"), format="cola")
  with pytest.raises(ValueError, match="format 'sst2'"):
    data.load_dataset(cfg, "eval", tokenizer=tokenizer)
  with pytest.raises(ValueError, match="data.path"):
    data.load_dataset(data.default_data_config("tsv"), "train", tokenizer=tokenizer)
  with pytest.raises(ValueError, match="does not exist"):
    data.load_dataset(data.default_data_config("tsv", path=str(shared_data / "nowhere")), "train",
                      tokenizer=tokenizer)


def test_limit_takes_a_seeded_subset(shared_data, tokenizer):
  path = str(shared_data / "text" / "cola")
  cfg = data.default_data_config("tsv", path=path, format="cola", limit=50, max_length=16)
  a = data.load_dataset(cfg, "train", tokenizer=tokenizer)
  cfg.seed = 1
  b = data.load_dataset(cfg, "train", tokenizer=tokenizer)
  assert len(a) == len(b) == 50
  assert not np.array_equal(a.arrays["input_ids"], b.arrays["input_ids"])
  idx = data.subset_indices(8551, 50, seed=0)
  assert len(set(idx)) == 50 and np.all(np.diff(idx) > 0)
  np.testing.assert_array_equal(idx, data.subset_indices(8551, 50, seed=0))
  np.testing.assert_array_equal(data.subset_indices(7, 50, seed=0), np.arange(7))
  with pytest.raises(ValueError, match="limit"):
    data.subset_indices(10, 0, seed=0)


# ---------------------------------------------------------------------------------- batches


def test_batch_is_a_pure_function_of_step():
  ds = _toy(12)
  np.testing.assert_array_equal(ds.batch(5, 4, seed=3)["x"], ds.batch(5, 4, seed=3)["x"])
  epoch0 = np.concatenate([ds.batch(s, 4, seed=3)["x"] for s in range(3)])
  epoch1 = np.concatenate([ds.batch(s, 4, seed=3)["x"] for s in range(3, 6)])
  assert sorted(epoch0) == sorted(epoch1) == list(range(12))
  assert not np.array_equal(epoch0, epoch1)          # a new permutation per epoch
  other = np.concatenate([ds.batch(s, 4, seed=4)["x"] for s in range(3)])
  assert not np.array_equal(epoch0, other)
  b = ds.batch(2, 4, seed=0)
  np.testing.assert_array_equal(b["labels"], b["x"] % 3)   # rows stay aligned across arrays


def test_batches_cross_epoch_boundaries_consistently():
  ds = _toy(10)
  stream = np.concatenate([ds.batch(s, 4, seed=0)["x"] for s in range(5)])   # 20 = 2 epochs
  assert sorted(stream[:10]) == sorted(stream[10:]) == list(range(10))
  np.testing.assert_array_equal(stream, np.concatenate(
      [ds.global_indices(s, 4, seed=0) for s in range(5)]))
  big = ds.batch(0, 25, seed=0)["x"]                        # batch larger than the data set
  assert sorted(big[:10]) == list(range(10)) and sorted(big[10:20]) == list(range(10))


def test_process_shards_partition_the_global_batch():
  ds = _toy(37)
  for step in (0, 7):
    full = ds.batch(step, 8, seed=1)["x"]
    shards = [ds.batch(step, 8, seed=1, process_index=p, process_count=4)["x"] for p in range(4)]
    assert all(len(s) == 2 for s in shards)
    np.testing.assert_array_equal(np.concatenate(shards), full)
  with pytest.raises(ValueError, match="multiple of process_count"):
    ds.batch(0, 6, seed=0, process_count=4)
  with pytest.raises(ValueError, match="process_index"):
    ds.batch(0, 8, seed=0, process_index=4, process_count=4)
  with pytest.raises(ValueError, match="step"):
    ds.batch(-1, 8, seed=0)


def test_eval_batches_cover_every_example_once():
  n = 11
  ds = _toy(n, loss_mask=np.ones((n, 3), np.int32))
  batches = list(ds.eval_batches(4))
  assert len(batches) == ds.num_eval_batches(4) == 3
  assert all(len(b["x"]) == 4 for b in batches)
  xs = np.concatenate([b["x"] for b in batches])
  w = np.concatenate([b["weights"] for b in batches])
  np.testing.assert_array_equal(xs[w == 1], np.arange(n))
  assert w.dtype == np.float32 and w.sum() == n and w[-1] == 0
  assert batches[-1]["loss_mask"][-1].sum() == 0 and batches[-1]["loss_mask"][:3].sum() == 9
  # Two processes: same number of batches, their slices together give the same rows.
  per_proc = [list(ds.eval_batches(4, process_index=p, process_count=2)) for p in range(2)]
  assert len(per_proc[0]) == len(per_proc[1]) == 3
  joined = np.concatenate([np.concatenate([a["x"], b["x"]]) for a, b in zip(*per_proc)])
  np.testing.assert_array_equal(joined, xs)


def test_dataset_validation():
  with pytest.raises(ValueError, match="same first dimension"):
    data.Dataset({"a": np.zeros(3), "b": np.zeros(4)}, None, None)
  with pytest.raises(ValueError, match="empty"):
    data.Dataset({"a": np.zeros(0)}, None, None)


# ----------------------------------------------------------------------------- config / errors


def test_config_and_dispatch_errors(tokenizer):
  with pytest.raises(ValueError, match="unknown data source 'csv'"):
    data.default_data_config("csv")
  with pytest.raises(ValueError, match="unknown data config key"):
    data.default_data_config("tsv", pth="x")
  cfg = data.default_data_config("chatterbot")
  with pytest.raises(ValueError, match="'train' or 'eval'"):
    data.load_dataset(cfg, "test", tokenizer=tokenizer)
  with pytest.raises(ValueError, match="tokenizer"):
    data.load_dataset(cfg, "train")
  cfg.source = "parquet"
  with pytest.raises(ValueError, match="unknown data source 'parquet'"):
    data.load_dataset(cfg, "train", tokenizer=tokenizer)
  # None split names resolve per source, so switching source keeps working.
  c = data.default_data_config("tsv")
  assert data.split_name(c, "eval") == "dev"
  c.source = "tfds"
  assert data.split_name(c, "eval") == "validation"


# ------------------------------------------------------------------------------------ tfds


@pytest.fixture(scope="module")
def tfds():
  import tensorflow_datasets
  return tensorflow_datasets


def test_tfds_text_under_mock(tfds, tokenizer):
  cfg = data.default_data_config("tfds", name="glue/cola", max_length=24)
  with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
    train = data.load_dataset(cfg, "train", tokenizer=tokenizer)
    cfg.limit = 5
    small = data.load_dataset(cfg, "train", tokenizer=tokenizer)
    src = data.tfds_source("glue/cola", "train")
    first = data._text(src[0]["sentence"])
  assert data._text(np.array(b"caf\xc3\xa9", dtype=object)) == "caf\u00e9"   # tfds stores bytes
  assert len(train) == 12 and len(small) == 5
  assert train.num_classes == 2 and train.label_names == ["unacceptable", "acceptable"]
  assert train.arrays["input_ids"].shape == (12, 24) and train.arrays["input_ids"].dtype == np.int32
  assert set(np.unique(train.arrays["labels"])) <= {0, 1}
  np.testing.assert_array_equal(train.arrays["input_ids"][0],
                                data.tokenize_texts(tokenizer, [first], 24)["input_ids"][0])


def test_tfds_image_under_mock(tfds):
  cfg = data.default_data_config("tfds_image", name="cifar100", limit=6, eval_limit=4)
  vit = registry.get("vit")
  norm = (vit.image_mean, vit.image_std)   # the family record's image processor
  with tfds.testing.mock_data(num_examples=10, policy=tfds.testing.MockPolicy.USE_CODE):
    train = data.load_dataset(cfg, "train", image_size=16, image_norm=norm)
    evals = data.load_dataset(cfg, "eval", image_size=16, image_norm=norm)
    raw = data.tfds_source("cifar100", "train")[int(data.subset_indices(10, 6, 0)[0])]["image"]
    cfg.name = "oxford_flowers102"   # mock images of varied sizes
    flowers = data.load_dataset(cfg, "train", image_size=8, image_norm=norm)
    other = data.load_dataset(cfg, "train", image_size=8, image_norm=(0.25, 2.0))
    with pytest.raises(ValueError, match="image_norm"):
      data.load_dataset(cfg, "train", image_size=8)
  assert len(train) == 6 and len(evals) == 4 and train.num_classes == 100
  assert train.arrays["pixel_values"].shape == (6, 3, 16, 16)
  assert train.arrays["pixel_values"].dtype == np.uint8
  b = train.batch(0, 4, seed=0)
  assert b["pixel_values"].dtype == np.float32 and b["pixel_values"].shape == (4, 3, 16, 16)
  assert -1.0 <= b["pixel_values"].min() and b["pixel_values"].max() <= 1.0
  # NCHW, resized, scaled to [0, 1] then (x - 0.5) / 0.5.
  expected = (data.resize_image(raw, 16).transpose(2, 0, 1) / 255.0 - 0.5) / 0.5
  np.testing.assert_allclose(next(train.eval_batches(6))["pixel_values"][0], expected, atol=1e-6)
  assert flowers.arrays["pixel_values"].shape == (6, 3, 8, 8)
  # Another family's constants give another normalisation of the same pixels.
  raw8 = flowers.arrays["pixel_values"][:2].astype(np.float32) / 255.0
  np.testing.assert_allclose(next(other.eval_batches(2))["pixel_values"], (raw8 - 0.25) / 2.0,
                             atol=1e-6)
  with pytest.raises(ValueError, match="image size"):
    data.load_dataset(cfg, "train", image_norm=norm)


def test_resize_and_normalize_values():
  img = np.full((5, 7, 3), 200, np.uint8)
  np.testing.assert_array_equal(data.resize_image(img, 4), np.full((4, 4, 3), 200, np.uint8))
  grey = np.arange(16, dtype=np.uint8).reshape(4, 4, 1)
  assert data.resize_image(grey, 4).shape == (4, 4, 3)
  px = data.normalize_pixels({"pixel_values": np.array([0, 255], np.uint8)}, 0.5, 0.5)
  np.testing.assert_allclose(px["pixel_values"], [-1.0, 1.0])


def test_tfds_not_prepared_is_a_clear_error_and_never_downloads(tfds, tmp_path, tokenizer):
  cfg = data.default_data_config("tfds", name="glue/sst2", data_dir=str(tmp_path))
  with pytest.raises(ValueError, match="tfds build glue/sst2"):
    data.load_dataset(cfg, "train", tokenizer=tokenizer)
  assert not any(tmp_path.rglob("*.array_record*")) and not any(tmp_path.rglob("downloads"))
  cfg.name = "no_such_dataset_xyz"
  with pytest.raises(ValueError, match="unknown tensorflow-datasets name"):
    data.load_dataset(cfg, "train", tokenizer=tokenizer)
