"""scripts/setup.sh and pyproject.toml agree on the Python our pinned dependencies need."""

from __future__ import annotations

import importlib.metadata
import os
import pathlib
import shutil
import subprocess
import tomllib

from packaging.specifiers import SpecifierSet

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_requires_python_is_what_the_pinned_jax_needs():
  ours = SpecifierSet(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"])
  for dist in ("jax", "jaxlib", "flax"):
    theirs = SpecifierSet(importlib.metadata.metadata(dist)["Requires-Python"])
    for version in ("3.10.14", "3.11.0", "3.12.3"):
      # a Python we accept must be one every pinned core dependency installs on
      assert not (version in ours and version not in theirs), (dist, version)
  assert "3.11.7" in ours


def test_setup_stops_on_an_old_python_before_creating_the_venv(tmp_path):
  shutil.copytree(ROOT / "scripts", tmp_path / "scripts")
  fake = tmp_path / "python3.10"
  # answers --version like Python 3.10 and fails the version check like it
  fake.write_text('#!/bin/sh\n[ "$1" = "--version" ] && { echo "Python 3.10.12"; exit 0; }\nexit 1\n')
  fake.chmod(0o755)
  proc = subprocess.run(["bash", "scripts/setup.sh"], cwd=tmp_path, capture_output=True, text=True,
                        env={**os.environ, "PYTHON": str(fake)}, timeout=60)
  assert proc.returncode == 1
  assert "Python 3.10.12" in proc.stderr and "needs Python >= 3.11" in proc.stderr
  assert not (tmp_path / ".venv").exists()
