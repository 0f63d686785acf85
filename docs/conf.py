"""Sphinx configuration of jaxgen's documentation site (``make docs``).

Sphinx with MyST and myst-nb, as optax and flax build theirs: the API reference comes
from the docstrings (autodoc, Google-style sections through napoleon), the CLI reference
from the parser (sphinx-argparse), and the notebooks are executed at build time, so
every page shows what the installed code does. MathJax is served from the site itself
(sphinx-mathjax-offline), so formulas render without a network.
"""

import importlib
import inspect
import os
import sys

import jaxgen

# Notebooks run at their tiny scale unless told otherwise (`JAXGEN_NOTEBOOK_SCALE=full`).
os.environ.setdefault("JAXGEN_NOTEBOOK_SCALE", "tiny")

project = "jaxgen"
author = "the jaxgen developers"
copyright = "2026, the jaxgen developers"
release = version = jaxgen.__version__

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "sphinx_copybutton",
    "sphinxarg.ext",
    "sphinx-mathjax-offline",
]

source_suffix = {".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "**.ipynb_checkpoints", "README.md"]
root_doc = "index"

myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3

nb_execution_mode = "force"
nb_execution_timeout = 600
nb_execution_raise_on_error = True
nb_execution_show_tb = True
nb_execution_in_temp = True

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_format = "short"
autodoc_default_options = {"members": False}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

# Broken cross-references fail the build; types of other libraries (no network here for
# their inventories) are written as plain text.
nitpicky = True
nitpick_ignore_regex = [
    ("py:.*", r"(jax|jaxlib|optax|flax|numpy|np|jnp|chex|orbax|collections|typing|pathlib)(\..*)?"),
    ("py:.*", r"(PyTree|LossFn|Array|ArrayLike|Any|Callable|Sequence|Mapping|Path)"),
    ("py:.*", r"(NoneType|int|float|bool|str|tuple|list|dict|object|type|os\.PathLike.*)"),
]
suppress_warnings = ["myst.header"]
smartquotes = False  # flags stay as typed: --lr, not an en dash

html_theme = "sphinx_book_theme"
html_title = f"jaxgen {version}"
html_static_path = ["_static"]
html_css_files = ["jaxgen.css"]
html_theme_options = {
    "show_toc_level": 2,
    "home_page_in_toc": True,
    "use_download_button": True,
    "navigation_with_keys": False,
}
html_show_sourcelink = False


# Every public name must appear in the API reference, with a docstring.
PUBLIC_MODULES = ("jaxgen", "jaxgen.bounds", "jaxgen.noise", "jaxgen.nnx")


def public_names():
    """``module.name`` for every name a public module exports (its ``__all__``)."""
    names = []
    for module_name in PUBLIC_MODULES:
        module = importlib.import_module(module_name)
        for name in module.__all__:
            if inspect.ismodule(getattr(module, name)):
                continue  # jaxgen.bounds and jaxgen.nnx have pages of their own
            names.append(f"{module_name}.{name}")
    return names


def api_problems(documented):
    """What the API reference lacks: one line per public name it leaves out or that has no
    docstring, given the names it documents (``documented``)."""
    problems = []
    for qualified in public_names():
        module_name, _, name = qualified.rpartition(".")
        if qualified not in documented:
            problems.append(f"public name {qualified} is missing from the API reference")
        if not inspect.getdoc(getattr(sys.modules[module_name], name)):
            problems.append(f"public name {qualified} has no docstring")
    return problems


def _check_api_reference(app, env):
    from sphinx.util import logging

    logger = logging.getLogger("jaxgen.api")
    for problem in api_problems(set(env.get_domain("py").objects)):
        logger.warning(problem)


def setup(app):
    app.connect("env-check-consistency", _check_api_reference)
