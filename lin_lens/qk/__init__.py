"""Why heads attend: exact QK attribution.

Detached mode takes the attention patterns as given; their pre-softmax scores are exactly
bilinear in the input (norm scales frozen, rotary linear given the positions), so
:func:`qk_attribution` splits a head's scores into pairs of a query-side and a key-side part —
input tokens through all paths (``by="tokens"``) or attribution-graph nodes through their direct
path (``by="nodes"``) — with every constant named. :mod:`.form` reads how a layer forms its
scores, :mod:`.sides` and :mod:`.nodes` split queries and keys into parts, :mod:`.result` holds
:class:`QKAttribution`, and :mod:`.intervene` removes one part with everything else frozen
(:func:`remove_key_part`).
"""

from lin_lens.qk.api import qk_attribution, qk_attributions
from lin_lens.qk.intervene import remove_key_part
from lin_lens.qk.result import Parts, QKAttribution, QKResults

__all__ = ["Parts", "QKAttribution", "QKResults", "qk_attribution", "qk_attributions",
           "remove_key_part"]
