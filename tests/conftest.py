"""Shared test set-up: offline, quiet runs and a skip for HookedTransformer-only tests.

Markers live in pyproject.toml ([tool.pytest.ini_options]); none are registered here.
"""

from __future__ import annotations

import os

import pytest

# Set before anything imports huggingface_hub / transformers (they read these at import time).
_ENV = {"LIN_LENS_PROGRESS": "0", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
os.environ.update(_ENV)


@pytest.fixture(autouse=True, scope="session")
def _quiet_offline_env():
    """Keep the variables above for the whole session, and progress bars off even if
    lin_lens.progress was imported before this conftest (it reads the variable once)."""
    os.environ.update(_ENV)
    import lin_lens.progress

    lin_lens.progress.ENABLED = False
    yield


def skip_unless_hooked() -> None:
    """Skip the calling test (or module, at import) when transformer_lens has no
    HookedTransformer, i.e. TL >= 4.0. ``from conftest import skip_unless_hooked``."""
    __tracebackhide__ = True  # report the skip at the caller's line, not here
    from importlib.metadata import version

    from lin_lens._tl import HAS_HOOKED

    if not HAS_HOOKED:
        pytest.skip(
            f"transformer_lens {version('transformer_lens')} has no HookedTransformer"
            " (removed in 4.0)",
            allow_module_level=True,
        )


@pytest.fixture
def requires_hooked() -> None:
    """Request as ``def test_x(requires_hooked): ...`` for HookedTransformer-only tests."""
    skip_unless_hooked()


def _skip_without_hooked():
    """Tests building tiny HookedTransformers skip on transformer_lens 4.x instead of failing."""
    from lin_lens.testing import HookedTransformerUnavailable

    try:
        return (yield)
    except HookedTransformerUnavailable as e:
        pytest.skip(str(e))


pytest_runtest_setup = pytest.hookimpl(wrapper=True)(_skip_without_hooked)
pytest_runtest_call = pytest.hookimpl(wrapper=True)(_skip_without_hooked)
