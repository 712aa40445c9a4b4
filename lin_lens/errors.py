"""Every error lin_lens raises on purpose derives from :class:`LinLensError`.

Each class also derives from the built-in exception a caller would naturally catch (``ValueError``
for a bad argument, ``KeyError`` for an unknown hook, ``MemoryError`` for a budget), so code written
against built-ins keeps working. Messages name the argument, its value and the real cause.
"""

from __future__ import annotations

from typing import Any


class LinLensError(Exception):
    """Base class of every lin_lens error."""


class InvalidArgumentError(LinLensError, ValueError):
    """An argument with a value lin_lens cannot use; the message names it and its value."""


class InvalidPositionError(InvalidArgumentError, IndexError):
    """A position, head or output index outside the range of the input or activation."""


class ArgumentTypeError(InvalidArgumentError, TypeError):
    """An argument of the wrong type (e.g. float token ids, a list where one int is needed)."""


class UnknownHookError(LinLensError, KeyError):
    """A hook name the model does not have; the message lists the closest names."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it readable
        return str(self.args[0])


class UnknownNodeError(LinLensError, KeyError):
    """A node label or index an attribution graph does not have."""

    def __str__(self) -> str:
        return str(self.args[0])


class NotLinearError(InvalidArgumentError):
    """A hook whose activation has no exact linear map in the input (e.g. an attention pattern)."""


class UnsupportedFeatureError(LinLensError, NotImplementedError):
    """A model feature that lin_lens cannot freeze exactly; the message names it."""


class NotExactError(LinLensError, ArithmeticError):
    """A detached map (or a decomposition) does not reconstruct its activation within the
    tolerance; the message names the real cause where lin_lens can tell it (non-finite inputs,
    an overflow). The result is kept in ``.linear_map`` for inspection.
    """

    def __init__(self, lm: Any, bound: float, cause: str | None = None):
        self.linear_map = lm
        self.bound = bound
        why = cause or (
            "Some nonlinearity of this model was not frozen by detached mode; please report "
            "the architecture.")
        what = "linear map" if hasattr(lm, "J4") else type(lm).__name__.lower()
        super().__init__(
            f"{what} at {lm.hook!r} is not exact: relative reconstruction error "
            f"{lm.relative_error:.3g} > tol={bound:.3g}. {why}")


class MemoryBudgetError(LinLensError, MemoryError):
    """The computation would not fit the memory budget; the message says what would."""


class FileFormatError(InvalidArgumentError):
    """A file lin_lens reads is not what it should be (not UTF-8, a malformed JSON line, a
    corpus run of another schema); the message names the file, the line and the cause."""


class MissingFileError(LinLensError, FileNotFoundError):
    """A file or a corpus run that lin_lens was asked to read does not exist."""


class OutputExistsError(LinLensError, FileExistsError):
    """An output location already holds results that lin_lens would not overwrite."""


class ModelNotAvailableError(LinLensError, ImportError):
    """A package lin_lens needs is missing: the one that ships a model's weights, the class a
    backend needs, or an optional extra (e.g. Ray)."""
