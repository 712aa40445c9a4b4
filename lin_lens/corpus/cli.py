"""``lin-lens corpus`` and ``lin-lens compare``, as parsers to add to ``lin-lens``'s own.

    lin-lens corpus phrases --model smollm2-135m --out runs/smollm2
    lin-lens corpus prompts.jsonl --field prompt --model smollm2-135m --out s3://b/run \\
        --engine ray --address auto --workers 16
    lin-lens compare runs/smollm2 runs/gemma3 --out compare.html

``lin_lens.cli`` adds these parsers with :func:`add_parsers` and dispatches to
``args.corpus_command``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from lin_lens.errors import LinLensError
from lin_lens.models import BACKENDS, DTYPES, NAME_HELP

ERRORS = (LinLensError, ValueError, IndexError, TypeError, ImportError, FileNotFoundError,
          FileExistsError)


def add_parsers(sub: Any) -> None:
    """Add ``corpus`` and ``compare`` to an ``argparse`` sub-parsers object."""
    c = sub.add_parser(
        "corpus", help="analyse many prompts into a resumable Parquet dataset",
        description="Compute the exact operator of the final hidden state for every prompt "
                    "and write one row per prompt (stable ranks, singular values, decoded "
                    "singular vectors, contributions to the predicted logit) to a Parquet "
                    "dataset. Killed and started again, it computes only what is missing.")
    c.add_argument("prompts", help="a .txt (one per line), .jsonl (--field) or .parquet "
                                   "(--field) file, or 'phrases' for the 100 shipped phrases")
    c.add_argument("--out", required=True, help="output directory or pyarrow URI (s3://…)")
    c.add_argument("--model", default="smollm2-135m", help="model: " + NAME_HELP)
    c.add_argument("--dtype", default="float32", choices=DTYPES)
    c.add_argument("--backend", default=None, choices=BACKENDS)
    c.add_argument("--field", default="text", help="JSONL field / Parquet column (default text)")
    c.add_argument("--hook", default="ln_final.hook_normalized", help="target hook")
    c.add_argument("--pos", type=int, action="append", default=None, metavar="P",
                   help="target position (repeatable; default -1, the last)")
    c.add_argument("--k", type=int, default=8, help="singular values kept (default 8)")
    c.add_argument("--analyses", default="svd,decode,contributions",
                   help="comma list of svd, decode, contributions, ordinary")
    c.add_argument("--engine", default="local", choices=("local", "ray"))
    c.add_argument("--workers", type=int, default=None, help="Ray workers (default: per CPU)")
    c.add_argument("--address", default=None, help="Ray cluster address (default: local)")
    c.add_argument("--batch-size", type=int, default=4, help="prompts per Ray task")
    c.add_argument("--shard-size", type=int, default=16, help="prompts per local shard")
    c.add_argument("--threads", type=int, default=None, help="torch threads per worker")
    c.add_argument("--no-resume", action="store_true",
                   help="refuse an output directory that already holds rows")
    c.add_argument("--no-progress", action="store_true", help="no progress bar")
    c.set_defaults(corpus_command=corpus_cmd)

    p = sub.add_parser(
        "compare", help="compare corpus runs in one offline HTML report",
        description="Summary table, stable rank by token position, error distribution and "
                    "each prompt's decoded singular vectors side by side, for several runs.")
    p.add_argument("runs", nargs="+", help="corpus run directories (or URIs)")
    p.add_argument("--out", type=Path, default=Path("compare.html"), help="report path")
    p.add_argument("--label", action="append", default=None, help="a label per run")
    p.add_argument("--max-prompts", type=int, default=200,
                   help="prompts shown side by side (default 200; 0 for all)")
    p.add_argument("--png", type=Path, default=None,
                   help="also save the stable-rank figure as this PNG")
    p.set_defaults(corpus_command=compare_cmd)


def _errors() -> tuple[type[BaseException], ...]:
    """Errors a user can cause with arguments: one line on stderr, exit code 2
    (LIN_LENS_DEBUG=1 for the traceback)."""
    import lin_lens

    return ERRORS + (getattr(lin_lens, "LinLensError", ValueError),)


def _fail(e: BaseException) -> int:
    if os.environ.get("LIN_LENS_DEBUG"):
        raise e
    print(f"lin-lens: error: {e}", file=sys.stderr)
    return 2


def corpus_cmd(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from lin_lens import corpus

    analyses = [a.strip() for a in args.analyses.split(",") if a.strip()]
    pos = -1 if not args.pos else (args.pos[0] if len(args.pos) == 1 else args.pos)
    t0 = time.perf_counter()
    try:
        spec = corpus.LoadSpec(args.model, args.dtype, args.backend)
        model = spec if args.engine == "ray" else spec.load()
        t_load = time.perf_counter() - t0
        rows = corpus.Rows(hook=args.hook, pos=pos, analyses=tuple(analyses), k=args.k)
        execution = corpus.Execution(
            engine=args.engine, workers=args.workers, resume=not args.no_resume,
            progress=not args.no_progress, shard_size=args.shard_size,
            batch_size=args.batch_size, address=args.address, threads=args.threads)
        path = corpus.run(model, args.prompts, args.out, rows, execution, field=args.field)
        t = corpus.read(path, columns=["status"])
    except _errors() as e:
        return _fail(e)
    statuses = t["status"].to_pylist()
    n_ok = statuses.count("ok")
    print(f"{path}: {t.num_rows} rows ({n_ok} ok, {len(statuses) - n_ok} failed) in "
          f"{time.perf_counter() - t0:.1f}s (model load {t_load:.1f}s)")
    return 0


def compare_cmd(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from lin_lens.corpus import views

    try:
        out = views.compare(*args.runs, out=args.out, labels=args.label,
                            max_prompts=args.max_prompts or None)
        if args.png is not None:
            views.stable_rank_plot(args.runs, args.label).savefig(args.png, dpi=120)
    except _errors() as e:
        return _fail(e)
    print(f"report: {out} ({out.stat().st_size / 1e6:.2f} MB)")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point (``python -m lin_lens.corpus.cli``) until ``lin-lens`` wires
    these sub-commands in."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(prog="lin-lens")
    add_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.corpus_command(args, parser)


if __name__ == "__main__":
    sys.exit(main())
