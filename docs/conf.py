"""Sphinx configuration of the deqhess site (``make docs``).

The pages are Markdown, read by MyST, so they stay plain text in the repository; the API
pages come from the docstrings (autodoc, Google style through napoleon); sphinx-gallery
runs the scripts of ``examples/`` during the build and shows their output and plots, as
curvlinops' documentation does. Warnings are errors (``sphinx-build -W``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import deqhess

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # gallery_config, named below by its qualified name

project = "deqhess"
author = "the deqhess developers"
copyright = "the deqhess developers"
version = release = deqhess.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "sphinx_gallery.gen_gallery",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build", "README.md", "auto_examples/*.ipynb", "auto_examples/*.py"]

myst_heading_anchors = 3

autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True  # "Attributes:" as fields: no second description of a dataclass field

sphinx_gallery_conf = {
    "examples_dirs": "../examples",
    "gallery_dirs": "auto_examples",
    # examples/factories.py holds the command line's problem factories, not an example
    "ignore_pattern": r"factories\.py",
    # run during the build (a few seconds to a minute each here); others are shown as code
    "filename_pattern": r"/(curvature_interop|gradient_norm_digits|mdeq_digits|laplace_digits)\.py",
    "reset_argv": "gallery_config.reset_argv",
    "within_subsection_order": "FileNameSortKey",
    "download_all_examples": False,
    "show_memory": False,
    "remove_config_comments": True,
}

html_theme = "furo"
html_title = f"deqhess {release}"
