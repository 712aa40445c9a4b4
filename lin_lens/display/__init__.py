"""Display: offline CircuitsVis views (:mod:`.views`) and the paper's figures (:mod:`.plots`).

``from lin_lens import display`` then ``display.contribution_view(lm)``, ``display.topk_view``,
``display.attention_view``, ``display.View``; figures in ``lin_lens.display.plots``.
"""

from lin_lens.display import plots
from lin_lens.display.qk import qk_view
from lin_lens.display.views import (
    View,
    attention_view,
    bundle_js,
    contribution_view,
    decoding_view,
    from_token_lists,
    page,
    script,
    split_render,
    str_tokens,
    topk_view,
)

__all__ = [
    "View",
    "attention_view",
    "bundle_js",
    "contribution_view",
    "decoding_view",
    "from_token_lists",
    "page",
    "plots",
    "qk_view",
    "script",
    "split_render",
    "str_tokens",
    "topk_view",
]
