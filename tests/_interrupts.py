"""Ctrl-C at a chosen line: run a call with ``KeyboardInterrupt`` raised at the n-th line
executed inside the code under test, to show that clean-up holds whichever line is hit.

    n = 1
    while not interrupt_at(n, call, under=PKG, skip={"finish"}):
        assert_state_unchanged()
        n += 1
"""

from __future__ import annotations

import linecache
import sys
from collections.abc import Callable, Collection


def interrupt_at(n: int, fn: Callable[[], object], *, under: str,
                 skip: Collection[str] = ("finish",)) -> bool:
    """Run ``fn``, raising KeyboardInterrupt at the n-th line executed in files whose path starts
    with ``under``; True if it completed first. Not injected: inside the functions named in
    ``skip`` (the clean-up itself, which also holds a real Ctrl-C until it is done) and on the
    statements that call ``finish(``, where clean-up begins (the one window Python cannot close:
    an interrupt on the very statement that starts a ``finally`` clause), and on ``try:`` and
    ``with`` lines. A ``try:`` compiles to a NOP, and a ``with`` line's event fires again when
    the block ends, just before ``__exit__`` is called: CPython checks for signals at neither
    place, so a real Ctrl-C cannot arrive there, but an exception that a trace function raises
    there leaves the enclosing ``with`` block without its ``__exit__`` (CPython 3.11; a lock
    taken by ``with lock:`` then stays held). ``tests/test_interrupts_helper.py`` shows both."""
    count = [0]

    def trace(frame, event, arg):
        code = frame.f_code
        if not code.co_filename.startswith(under) or code.co_name in skip:
            return None
        line = linecache.getline(code.co_filename, frame.f_lineno) if event == "line" else ""
        stmt = line.strip()
        if (event == "line" and "finish(" not in line and stmt != "try:"
                and not stmt.startswith(("with ", "async with "))):
            count[0] += 1
            if count[0] == n:
                raise KeyboardInterrupt
        return trace

    sys.settrace(trace)
    try:
        fn()
        return True
    except KeyboardInterrupt:
        return False
    finally:
        sys.settrace(None)
