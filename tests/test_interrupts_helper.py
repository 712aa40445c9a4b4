"""The interrupt-at-line helper itself never raises on a ``try:`` line.

On CPython 3.11 an exception that a trace function raises on a ``try:`` line (a NOP, where a real
Ctrl-C is never delivered) leaves the enclosing ``with`` block without calling its ``__exit__``
(``with cm: ... try: ...`` interrupted on the ``try:`` never calls ``cm.__exit__``), so the
state-safety tests would report a leak no real Ctrl-C can cause.
"""

from __future__ import annotations

from tests._interrupts import interrupt_at


def _body(log: list[int]) -> None:
    log.append(1)
    try:
        log.append(2)
    except ValueError:
        pass
    log.append(3)


def test_the_helper_interrupts_every_line_but_try():
    interrupted = []
    n = 1
    while not interrupt_at(n, lambda: _body([]), under=__file__, skip=()):
        interrupted.append(n)
        n += 1
    assert interrupted == [1, 2, 3, 4]  # the lambda and the three log.append lines, not try:
