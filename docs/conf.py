"""Sphinx configuration: the API reference from lin_lens's docstrings (``./dev docs``).

Built offline (no intersphinx) and strictly: ``-W --nitpicky`` turns every warning, a reference
that does not resolve included, into a failure. References into other libraries (torch,
TransformerLens, …) cannot resolve without their inventories, so only those are let through.
"""

from __future__ import annotations

import lin_lens

project = "lin_lens"
author = "The lin_lens developers"
copyright = "2026, The lin_lens developers"
release = version = lin_lens.__version__

extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon"]
exclude_patterns = ["_build"]
html_theme = "alabaster"
html_theme_options = {"description": "Exact linear maps of transformer activations"}

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
# names imported only for type checkers (an import cycle at run time)
autodoc_type_aliases = {"Ablation": "lin_lens.graph.intervene.Ablation"}
napoleon_google_docstring = True
napoleon_numpy_docstring = False

nitpicky = True
# Names outside lin_lens: no inventories are fetched at build time (no network).
_EXTERNAL = (r"(torch|numpy|np|pyarrow|pa|transformer_lens|transformers|jaxtyping|matplotlib"
             r"|circuitsvis|ray|pandas|collections|typing|typing_extensions|os|pathlib|dataclasses"
             r"|types|enum|contextlib|builtins)(\..+)?")
nitpick_ignore_regex = [
    (r"py:.*", _EXTERNAL),
    (r"py:class", r"Tensor"),  # `from torch import Tensor` in signatures
    # Docstrings point readers at the module that implements a thing; only the public API is
    # documented here, so a module reference is not required to resolve (names still are).
    (r"py:mod", r"lin_lens(\..+)?"),
]
