"""Shared test fixtures. Everything runs offline on CPU."""

import os
import pathlib

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data():
  """../shared/data, or a skip with the reason where a user's clone has no such folder."""
  if not SHARED_DATA.is_dir():
    pytest.skip(f"{SHARED_DATA} is absent (it is present in CI); these tests need the real data sets.")
  return SHARED_DATA
