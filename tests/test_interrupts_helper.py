"""The interrupt-at-line helper itself: it never raises on a ``try:`` or ``with`` line.

On CPython 3.11 an exception that a trace function raises on a ``try:`` line (a NOP), or on a
``with`` line when its block ends (just before ``__exit__`` is called), leaves the enclosing
``with`` block without calling its ``__exit__``; a real Ctrl-C is never delivered at either place
(no signal check there). Left in, those lines made the state-safety tests report leaks no real
Ctrl-C can cause (a hook left on the model; a ``with lock:`` left holding the lock, which then
hung another thread).
"""

from __future__ import annotations

import threading

from tests._interrupts import interrupt_at

_LOCK = threading.Lock()


def _body(log: list[int]) -> None:
    log.append(1)
    with _LOCK:
        log.append(2)
        try:
            log.append(3)
        except ValueError:
            pass
    log.append(4)


def test_the_helper_skips_try_and_with_lines_and_never_leaks_the_lock():
    interrupted = []
    n = 1
    while not interrupt_at(n, lambda: _body([]), under=__file__, skip=()):
        assert not _LOCK.locked(), f"the lock leaked at line {n}"
        interrupted.append(n)
        n += 1
    assert interrupted == [1, 2, 3, 4, 5]  # the lambda and the four log.append lines
    assert not _LOCK.locked()
