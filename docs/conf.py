"""Sphinx configuration of the doran_jax site: docs/*.md through MyST, the API from docstrings.

Build it with `bash scripts/docs.sh` (HTML in docs/_build/html; warnings are errors).
"""

import re

project = "doran_jax"
author = "the doran_jax authors"
copyright = "2026, the doran_jax authors"  # pylint: disable=redefined-builtin
release = version = "0.2.0"

extensions = ["myst_parser", "sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.mathjax"]
source_suffix = {".md": "markdown"}
root_doc = "index"  # the getting-started page: the site opens on it
exclude_patterns = ["_build"]

# MyST: `[x](training.md#some-heading)` links resolve through heading anchors; $...$ maths.
myst_heading_anchors = 4
myst_enable_extensions = ["dollarmath", "amsmath"]

# The API reference: Google-style docstrings (Args:, Returns:, Example:) read by napoleon.
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True  # dataclass `Attributes:` as fields, not a second entry per field
# Docstrings write `name` for code, as Markdown does.
default_role = "literal"

# Nitpicky (-n): every cross-reference must resolve, except types of other libraries (no
# intersphinx: the build runs offline) and of modules the reference does not document.
nitpick_ignore_regex = [
    (r"py:.*", r"(jax|jaxlib|jnp|np|numpy|flax|optax|ml_collections|transformers|typing|"
               r"collections|contextlib)(\..*)?"),
    (r"py:.*", r"(Any|Callable|Mapping|Optional|Sequence|Union|NamedTuple)"),
    (r"py:.*", r"doran_jax\.(targets|sharding|quant)\..*"),
]

html_theme = "sphinx_book_theme"
html_title = "doran_jax"
html_theme_options = {"show_toc_level": 2}


# docs/results/*.md are written by the study and benchmark scripts: tables, often without a
# title or starting at ### headings. The site shows them unchanged except for a title (the file
# name) and headings lifted to sit under it, so the files stay as the scripts write them.
_HEADING = re.compile(r"^(#{1,6}) ", re.M)


def _result_page(app, docname, source):
  del app
  if not docname.startswith("results/"):
    return
  text = source[0]
  body = re.sub(r"```.*?```", "", text, flags=re.S)  # '#' comment lines in code are not headings
  levels = [len(m.group(1)) for m in _HEADING.finditer(body)]
  shift = min(levels) - 2 if levels else 0
  if shift > 0:
    parts = re.split(r"(```.*?```)", text, flags=re.S)
    text = "".join(p if p.startswith("```") else
                   _HEADING.sub(lambda m: "#" * (len(m.group(1)) - shift) + " ", p) for p in parts)
  if not text.lstrip().startswith("# "):
    text = f"# {docname.split('/', 1)[1]}\n\n{text}"
  source[0] = text


def setup(app):
  app.connect("source-read", _result_page)
