"""The TransformerLens classes lin_lens works with, whichever of them this version ships.

TransformerLens 3.x has both ``HookedTransformer`` and ``TransformerBridge`` (the latter under
``transformer_lens.model_bridge``); 4.x removed ``HookedTransformer``. lin_lens itself only uses
the hook-name protocol both share, so these imports matter to loaders and tests alone.
"""

from __future__ import annotations

import warnings

import transformer_lens

TL_VERSION: str = getattr(transformer_lens, "__version__", "unknown")

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    try:
        from transformer_lens import HookedTransformer  # TL ≤ 3.x
    except ImportError:  # TL 4.x
        HookedTransformer = None  # type: ignore[assignment,misc]

try:
    from transformer_lens.model_bridge import TransformerBridge
except ImportError:  # pragma: no cover - TL < 3.0
    TransformerBridge = None  # type: ignore[assignment,misc]

HAS_HOOKED = HookedTransformer is not None
HAS_BRIDGE = TransformerBridge is not None
