"""The TransformerLens classes lin_lens works with, whichever of them this version ships.

TransformerLens 3.x has both ``HookedTransformer`` and ``TransformerBridge`` (the latter under
``transformer_lens.model_bridge``); 4.x removed ``HookedTransformer``. lin_lens itself only uses
the hook-name protocol both share, so these imports matter to loaders and tests alone.
"""

from __future__ import annotations

import warnings
from importlib import metadata

try:  # transformer_lens 4.x has no __version__ attribute
    TL_VERSION: str = metadata.version("transformer_lens")
except metadata.PackageNotFoundError:  # pragma: no cover - source checkout
    TL_VERSION = "unknown"

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
