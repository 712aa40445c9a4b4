"""Memory preflight: estimate peak bytes before computing, pick chunk sizes that fit a budget, and
refuse (pointing to the matrix-free path) when the full operator cannot fit.

The budget is ``max_memory`` bytes when given (an int, or a string such as ``"4GB"``), otherwise
``min(available RAM / 2, 8 GB)`` for a model on the CPU and 80 % of the free memory of the GPU for a
model on CUDA (free to the driver plus what torch's allocator holds unused). Available RAM is read
from ``/proc/meminfo`` (Linux) or ``os.sysconf``; no extra dependency.

The estimates are deliberately simple and on the safe side (checked against measured peak RSS in
``bench/``; the comparison is in BENCHMARKS.md):

* the result: ``J`` (and, for ``"logits"``, the operator on the vocabulary) plus its constants;
* the forward graph kept for the VJPs: per layer ``n·(c_m·d_model + c_f·d_mlp)`` values and the
  attention pattern ``n_heads·n²``, plus one layer's transient attention scores;
* per batched VJP/JVP row: one activation-sized gradient per layer in flight, ``n·(d_model·4 +
  d_mlp·3)`` values, plus the row's input gradient.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import re
from collections.abc import Iterator
from typing import Any

import torch

from lin_lens.errors import InvalidArgumentError, MemoryBudgetError

GB = 1024**3
DEFAULT_CAP = 8 * GB
MIN_CHUNK, MAX_CHUNK = 8, 256
PREFERRED_CHUNK = 64  # rows per batched VJP at short inputs (tuned in bench/, BENCHMARKS.md)
# Rows per batched pass at long inputs: chunk · n_tokens ≈ PASS_ROWS. Under is_grads_batched
# (vmap) the attention backward copies the frozen pattern once per row, [chunk, heads, n, n], so
# large chunks stop paying beyond about PASS_ROWS token-rows; at long inputs single unbatched
# passes are fastest (BENCHMARKS.md).
PASS_ROWS = 1536

_BUDGET: contextvars.ContextVar[int | None] = contextvars.ContextVar("lin_lens_budget",
                                                                     default=None)


GPU_SHARE = 0.8  # of a CUDA device's free memory: the default budget there


def _cuda(device: torch.device | str | None) -> torch.device | None:
    d = torch.device(device) if device is not None else None
    return d if d is not None and d.type == "cuda" else None


def available_bytes(device: torch.device | str | None = None) -> int:
    """Memory that computations on ``device`` can get now: for a CUDA device its free memory
    plus what torch's caching allocator holds unused; otherwise the RAM the OS can give us
    (MemAvailable), or total RAM if that is unknown."""
    cuda = _cuda(device)
    if cuda is not None:
        free, _ = torch.cuda.mem_get_info(cuda)
        return int(free + torch.cuda.memory_reserved(cuda) - torch.cuda.memory_allocated(cuda))
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 16 * GB


def parse_bytes(value: int | float | str | None) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise InvalidArgumentError(
            f"max_memory must be bytes or a string like '4GB', got {value!r}")
    if isinstance(value, (int, float)):
        if value <= 0:
            raise InvalidArgumentError(f"max_memory must be positive, got {value!r}")
        return int(value)
    m = re.fullmatch(r"\s*([0-9.]+)\s*([kKmMgGtT]?)i?[bB]?\s*", value)
    if not m:
        raise InvalidArgumentError(f"cannot read max_memory={value!r}; use bytes or e.g. '4GB'")
    mult = {"": 1, "k": 1024, "m": 1024**2, "g": GB, "t": 1024 * GB}[m.group(2).lower()]
    return int(float(m.group(1)) * mult)


def default_budget(device: torch.device | str | None = None) -> int:
    """``min(available RAM / 2, 8 GB)``; on a CUDA device 80 % of its available memory (a GPU's
    memory is there for the computation; a laptop's RAM is shared with everything else)."""
    if _cuda(device) is not None:
        return int(available_bytes(device) * GPU_SHARE)
    return min(available_bytes() // 2, DEFAULT_CAP)


def default_rule(device: torch.device | str | None = None) -> str:
    if _cuda(device) is not None:
        return f"default {GPU_SHARE:.0%} of {device}'s available memory"
    return "default min(available RAM / 2, 8 GB)"


def budget(max_memory: int | float | str | None = None,
           device: torch.device | str | None = None) -> int:
    """The byte budget in force: the argument, else an enclosing :func:`memory_budget`, else the
    default for ``device`` (:func:`default_budget`)."""
    b = parse_bytes(max_memory)
    if b is not None:
        return b
    ctx = _BUDGET.get()
    return ctx if ctx is not None else default_budget(device)


@contextlib.contextmanager
def memory_budget(max_memory: int | float | str | None) -> Iterator[int]:
    """Make ``max_memory`` the budget of every lin_lens call inside the block."""
    b = parse_bytes(max_memory)
    token = _BUDGET.set(b)
    try:
        yield budget()
    finally:
        _BUDGET.reset(token)


def fmt(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TB"  # pragma: no cover


# -- model-size bookkeeping --------------------------------------------------------------------

def _dims(model: Any) -> dict[str, int]:
    cfg = model.cfg
    d_model = int(cfg.d_model)
    return dict(
        d_model=d_model,
        d_mlp=int(getattr(cfg, "d_mlp", None) or 4 * d_model),
        n_heads=int(getattr(cfg, "n_heads", 1) or 1),
        n_layers=int(cfg.n_layers),
        d_vocab=int(getattr(cfg, "d_vocab", 0) or 0),
    )


def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def graph_bytes(model: Any, n_tokens: int, dtype: torch.dtype) -> int:
    """Forward activations kept for the backward pass (and the frozen factors for replay): per
    layer the residual- and MLP-sized tensors and the frozen pattern, plus one layer's transient
    scores, mask and softmax (the pattern is detached, so earlier layers' scores are freed), plus
    a weight-sized workspace that every engine was measured to need even at short inputs
    (estimates vs measured peaks: BENCHMARKS.md, "Memory")."""
    d = _dims(model)
    per_layer = n_tokens * (12 * d["d_model"] + 4 * d["d_mlp"]) + d["n_heads"] * n_tokens**2
    transient = 3 * d["n_heads"] * n_tokens**2
    weights = sum(p.numel() for p in model.parameters())
    return int((per_layer * d["n_layers"] + transient + weights) * itemsize(dtype))


def row_bytes(model: Any, n_tokens: int, dtype: torch.dtype, d_in: int | None = None) -> int:
    """Working memory of one row (one VJP or JVP) of a batched pass."""
    d = _dims(model)
    d_in = d_in or d["d_model"]
    per = n_tokens * (6 * d["d_model"] + 4 * d["d_mlp"] + 2 * d_in)
    per += d["n_heads"] * n_tokens * n_tokens  # score-sized temporaries (replay, eager attention)
    return int(per * itemsize(dtype))


def preferred_chunk(n_tokens: int) -> int:
    """Rows per batched VJP/JVP for an ``n_tokens`` input before any memory limit."""
    return max(1, min(PREFERRED_CHUNK, PASS_ROWS // max(1, n_tokens)))


def choose_chunk(model: Any, n_tokens: int, dtype: torch.dtype, free_bytes: int,
                 preferred: int, total_rows: int, cap: int = MAX_CHUNK) -> int:
    """Largest chunk ≤ ``preferred`` (and ``cap``) whose working memory fits ``free_bytes`` (at
    least MIN_CHUNK unless even that does not fit, then 1)."""
    per = max(1, row_bytes(model, n_tokens, dtype))
    fit = max(1, free_bytes // per)
    chunk = min(preferred, cap, fit, max(1, total_rows))
    return int(max(1, chunk))


def check(need: int, what: str, max_memory: int | float | str | None = None,
          hint: str | None = None, device: torch.device | str | None = None) -> int:
    """Raise :class:`MemoryBudgetError` if ``need`` bytes exceed the budget for a computation on
    ``device`` (default: the CPU); return the budget."""
    b = budget(max_memory, device)
    if need > b:
        where = "RAM" if _cuda(device) is None else f"on {device}"
        msg = (f"{what} needs about {fmt(need)}, more than the memory budget of {fmt(b)} "
               f"(max_memory=; {default_rule(device)}, {fmt(available_bytes(device))} "
               f"available {where} now).")
        msg += " " + (hint or (
            "Ask for less (one position, out_index=, direction=), raise max_memory, or use the "
            "matrix-free path: lin_lens.top_singular(model, tokens, hook, k=16) gives "
            "the top singular triplets without forming J."))
        raise MemoryBudgetError(msg)
    return b


def estimate_linear_map(model: Any, n_tokens: int, n_tgt: int, d_act: int, d_out: int,
                        d_in: int, dtype: torch.dtype, chunk: int) -> dict[str, int]:
    """Peak-byte estimate of one reverse-mode ``linear_map`` call (parts and total)."""
    isz = itemsize(dtype)
    n_src = n_tokens
    parts = {
        "J (activation rows)": n_tgt * n_src * d_act * d_in * isz,
        "J (output)": n_tgt * n_src * d_out * d_in * isz if d_out != d_act else 0,
        "forward graph": graph_bytes(model, n_tokens, dtype),
        "batched rows": chunk * row_bytes(model, n_tokens, dtype, d_in),
    }
    parts["total"] = sum(parts.values())
    return parts
