"""Progress bars for long computations, with one switch for all of lin_lens."""

from __future__ import annotations

import os

from tqdm.auto import tqdm

# Off with LIN_LENS_PROGRESS=0 or lin_lens.progress.ENABLED = False; per call with progress=False.
ENABLED = os.environ.get("LIN_LENS_PROGRESS", "1") not in ("0", "false", "no")
AUTO_MIN = 256  # with progress=None, bars appear only for at least this many steps


def progress_bar(total: int, desc: str, progress: bool | None = None, **kw) -> tqdm:
    show = ENABLED and (progress if progress is not None else total >= AUTO_MIN)
    return tqdm(total=total, desc=desc, disable=not show, leave=False, **kw)
