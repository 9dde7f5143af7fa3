"""The documentation site (docs/, built by scripts/docs.sh): its examples run and its API
reference is complete.

- Every ```python block of the getting-started page (docs/index.md) runs, in order, in one
  namespace, and asserts its own results.
- Every function, method and class the API reference documents has a docstring example, and
  every public name of doran_jax, doran_jax.adapters and doran_jax.models is in the reference.
- The self-contained docstring examples run as doctests.
The build itself (warnings are errors) runs in scripts/test.sh, before pytest.
"""

import doctest
import importlib
import inspect
import pathlib
import re
import sys
import tomllib
import types

import pytest

import doran_jax
from doran_jax import errors, models
from doran_jax.adapters import config as adapter_config
from doran_jax.adapters import core, method
from doran_jax.models import generate, registry

REPO = pathlib.Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
REFERENCE_PAGES = ("api.md", "errors.md")


def python_blocks_of(text: str) -> list[str]:
  return re.findall(r"^```python\n(.*?)^```", text, re.M | re.S)


def python_blocks(page: pathlib.Path) -> list[str]:
  return python_blocks_of(page.read_text(encoding="utf-8"))


def test_getting_started_examples_run(tmp_path, monkeypatch, capsys):
  blocks = python_blocks(DOCS / "index.md")
  assert len(blocks) >= 5, "the getting-started page lost its examples"
  monkeypatch.chdir(tmp_path)   # the page writes out/merged
  namespace = {"__name__": "getting_started"}
  for i, block in enumerate(blocks):
    exec(compile(block, f"docs/index.md python block {i + 1}", "exec"), namespace)  # pylint: disable=exec-used
  out = capsys.readouterr().out
  assert "{'targets': {'hidden': {'lora_a': (16, 4), 'lora_b': (4, 64), 'magnitude': (64,)}}}" in out
  first, last = map(float, re.search(r"^loss (\S+) -> (\S+) with 384 trainable", out, re.M).groups())
  assert last < 0.5 * first
  assert set(re.findall(r"^(\w+)\s+\d+ trainable parameters, max", out, re.M)) == {
      "lora", "dora", "doran", "dyndora"}
  assert (tmp_path / "out" / "merged" / "config.json").is_file()
  assert (tmp_path / "out" / "merged" / "model.safetensors").is_file()


def test_readme_api_example_runs(tmp_path, monkeypatch, capsys):
  # The README's API block on the real MiniLM (the PyPI package): what a newcomer pastes first.
  readme = (REPO / "README.md").read_text(encoding="utf-8")
  block = python_blocks_of(readme.split("## The API", 1)[1])[0]
  monkeypatch.chdir(tmp_path)   # it writes out/merged
  namespace = {"__name__": "readme"}
  exec(compile(block, "README.md API block", "exec"), namespace)  # pylint: disable=exec-used
  assert namespace["logits"].shape == (2, 2)
  assert capsys.readouterr().out.split() == [str(namespace["dj"].count_params(namespace["adapters"]))]
  assert (tmp_path / "out" / "merged" / "config.json").is_file()


def _directives(page: pathlib.Path):
  """(directive, dotted name, [members]) of the autodoc directives of a reference page."""
  text = page.read_text(encoding="utf-8")
  pattern = re.compile(r"^\.\. (auto\w+):: (\S+)\n((?:   .*\n|\n)*)", re.M)
  for kind, name, body in pattern.findall(text):
    members = re.search(r":members:(.*?)(?=\n   :|\Z)", body, re.S)
    names = [m.strip() for m in members.group(1).split(",")] if members else []
    yield kind, name, [n for n in names if n]


def _resolve(dotted: str):
  module, _, attr = dotted.rpartition(".")
  if module and hasattr(importlib.import_module(module), attr):
    return getattr(importlib.import_module(module), attr)
  return importlib.import_module(dotted)


def _class_members(cls):
  """The public methods and properties of `cls` that autodoc shows (those with a docstring)."""
  for name, value in vars(cls).items():
    fn = value.fget if isinstance(value, property) else value
    if not name.startswith("_") and inspect.isfunction(fn) and fn.__doc__:
      yield name, value


def documented():
  """{dotted name: object} of every object the reference pages document."""
  out = {}
  for page in REFERENCE_PAGES:
    for kind, name, members in _directives(DOCS / page):
      obj = _resolve(name)
      if kind != "automodule":
        out[name] = obj
      for member in members:
        value = getattr(obj, member)
        out[f"{name}.{member}"] = value
        if kind == "automodule" and inspect.isclass(value):   # autodoc shows its methods too
          out.update((f"{name}.{member}.{m}", v) for m, v in _class_members(value))
  return out


def _needs_example(name, obj):
  if not (callable(obj) or isinstance(obj, property)):
    return False   # modules and data (doran_jax.METHODS, models.TASKS)
  if inspect.isclass(obj) and issubclass(obj, errors.UserError) and obj is not errors.UserError:
    return False   # the kinds of UserError: one line each, the example is on UserError
  return True


def test_every_documented_function_has_an_example():
  objs = documented()
  assert len(objs) > 40
  missing = []
  for name, obj in objs.items():
    if not _needs_example(name, obj):
      continue
    doc = inspect.getdoc(obj.fget if isinstance(obj, property) else obj) or ""
    if "Example" not in doc:
      missing.append(name)
  assert not missing, f"docstrings without an example: {missing}"


def test_public_names_are_in_the_reference():
  objs = documented()
  ids = {id(o) for o in objs.values()}
  names = set(objs)
  for name in doran_jax.__all__:
    assert f"doran_jax.{name}" in names, name
  adapters = importlib.import_module("doran_jax.adapters")
  for name, obj in vars(adapters).items():
    if not name.startswith("_") and not isinstance(obj, types.ModuleType):
      assert id(obj) in ids or f"doran_jax.{name}" in names, f"doran_jax.adapters.{name}"
  own = [n for n, o in vars(models).items() if not n.startswith("_") and
         (inspect.isfunction(o) or inspect.isclass(o)) and o.__module__ == "doran_jax.models"]
  assert len(own) >= 10
  for name in own:
    assert f"doran_jax.models.{name}" in names, f"doran_jax.models.{name} is not in docs/api.md"


# Docstring examples that need no model download, no prepared names and no files of their own:
# they run here as doctests (the rest are checked for presence above).
SELF_CONTAINED = [
    adapter_config.AdapterConfig.has_adapters, adapter_config.AdapterConfig.stored_rank,
    adapter_config.AdapterConfig.scale, adapter_config.AdapterConfig.replace,
    adapter_config.AdapterConfig.to_dict, adapter_config.AdapterConfig.to_json,
    adapter_config.AdapterConfig.from_dict, adapter_config.AdapterConfig.from_json,
    core.targets_for, core.count_params,
    method.Method, method.Method.needs_norm, method.Method.generator_for, method.register,
    method.unregister, method.names, method.get, method.leaf_shape, method.Training,
    models.HFConfig, models.Backbone, models.minilm_path, models.family_of, models.tiny_config,
    models.quantized_paths, models.from_config,
    registry.Family, registry.Family.head, registry.Family.check_task,
    registry.Family.tensor_parallel_rules, registry.Family.dummy_batch, registry.Family.targets,
    generate.CacheSpec.init,
    errors.UserError, errors.verbose_from_env, errors.format_error, errors.reported,
]


@pytest.mark.parametrize("obj", SELF_CONTAINED,
                         ids=lambda o: getattr(o.fget if isinstance(o, property) else o,
                                               "__qualname__", str(o)))
def test_docstring_example_runs(obj, monkeypatch):
  monkeypatch.delenv("DORAN_VERBOSE", raising=False)
  fn = obj.fget if isinstance(obj, property) else obj
  module = sys.modules[fn.__module__]
  tests = doctest.DocTestFinder(recurse=False).find(fn, fn.__qualname__, module=module,
                                                    globs=dict(vars(module)))
  assert tests and sum(len(t.examples) for t in tests) > 0
  runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
  for test in tests:
    runner.run(test)
  assert runner.failures == 0, f"{runner.failures} failing example(s) in {fn.__qualname__}"


def test_docs_requirements_match_the_extra():
  pins = [line.split("#")[0].strip() for line in
          (REPO / "requirements-docs.txt").read_text(encoding="utf-8").splitlines()]
  extra = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))[
      "project"]["optional-dependencies"]["docs"]
  assert [p for p in pins if p] == extra
