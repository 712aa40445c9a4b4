"""``lin-lens``: analyse a prompt with exact linear maps and write an offline HTML report.

    lin-lens analyze "The bridge out of Marin is the"
    lin-lens analyze "w1 w2 w3" --model tiny-gpt2 --hook blocks.1.hook_resid_post --json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from lin_lens.models import BACKENDS, DTYPES, NAME_HELP


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lin-lens",
        description="Exact linear maps (detached Jacobians) of transformer activations.",
    )
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser(
        "analyze", help="analyse one prompt and write a self-contained HTML report",
        description="Compute the exact operator of the final hidden state (and of any --hook) "
                    "with respect to the input embeddings at one position, decode its singular "
                    "vectors, and write an offline HTML report.",
    )
    a.add_argument("text", help="the prompt")
    a.add_argument("--model", default="smollm2-135m", help="model: " + NAME_HELP)
    a.add_argument("--hook", action="append", dest="hooks", metavar="NAME",
                   help="target hook (repeatable; default ln_final.hook_normalized)")
    a.add_argument("--pos", type=int, default=-1, help="target position (default -1, the last)")
    a.add_argument("--dtype", default="float32", choices=DTYPES)
    a.add_argument("--backend", default=None, choices=BACKENDS,
                   help="HookedTransformer or TransformerBridge (default: hooked where this "
                        "TransformerLens has it)")
    a.add_argument("--out", type=Path, default=Path("lin_lens_report.html"),
                   help="report path (default ./lin_lens_report.html)")
    a.add_argument("--json", action="store_true",
                   help="print a machine-readable summary to stdout instead of the text one")
    a.add_argument("--sweep", nargs="?", const="all", default=None, metavar="LAYERS",
                   help="also sweep layers (all, or a comma list such as 0,10,20,29): stable rank "
                        "of resid_post / attn_out / mlp_out operators; slow on real models")
    a.add_argument("--attn-layers", default=None, metavar="LAYERS",
                   help="attention pattern layers to show (comma list; default the last)")
    a.add_argument("--qk", action="append", default=None, metavar="LAYER.HEAD",
                   help="also explain why this head attends where it does at the target "
                        "position (exact QK attribution by tokens; repeatable, e.g. --qk 3.5)")
    a.add_argument("--no-ordinary", action="store_true",
                   help="skip the ordinary Jacobian (halves the time; no comparison in the plot)")
    a.add_argument("--no-progress", action="store_true", help="no progress bars")
    from lin_lens.corpus.cli import add_parsers

    add_parsers(sub)  # lin-lens corpus / lin-lens compare
    from lin_lens.explorer.cli import add_parsers as add_explorer

    add_explorer(sub)  # lin-lens serve
    return p


def _layers(arg: str | None, what: str, parser: argparse.ArgumentParser) -> Any:
    if arg is None or arg == "all":
        return arg is not None
    try:
        return [int(x) for x in arg.split(",") if x.strip()]
    except ValueError:
        parser.error(f"{what}: expected 'all' or a comma-separated list of integers, got {arg!r}")


def load(name: str, dtype: str, backend: str | None) -> Any:
    """A model by name or path, as :func:`lin_lens.load_model` takes it (offline by default)."""
    from lin_lens.models import LoadSpec

    return LoadSpec(name, dtype, backend).load()


def _lin_lens_errors() -> tuple[type[BaseException], ...]:
    """Errors a user can cause with arguments: shown as one line, exit code 2 (set
    LIN_LENS_DEBUG=1 for the traceback)."""
    from lin_lens.errors import LinLensError

    return (LinLensError, ValueError, IndexError, ImportError, FileNotFoundError)


def _heads(values: list[str] | None, parser: argparse.ArgumentParser) -> list[tuple[int, int]]:
    out = []
    for v in values or []:
        try:
            layer, head = (int(x) for x in v.split("."))
        except ValueError:
            parser.error(f"--qk: expected LAYER.HEAD such as 3.5, got {v!r}")
        out.append((layer, head))
    return out


def analyze_cmd(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    args.qk_heads = _heads(args.qk, parser)
    sweep = _layers(args.sweep, "--sweep", parser)
    attn = _layers(args.attn_layers, "--attn-layers", parser) or None
    if args.no_progress:
        os.environ["LIN_LENS_PROGRESS"] = "0"
    import lin_lens.progress

    if args.no_progress:
        lin_lens.progress.ENABLED = False
    from lin_lens import report

    log = sys.stderr
    try:
        # stdout carries only our summary (JSON must parse): libraries' prints go to stderr
        with contextlib.redirect_stdout(log):
            s = _run(args, sweep, attn, log)
    except _lin_lens_errors() as e:
        if os.environ.get("LIN_LENS_DEBUG"):
            raise
        print(f"lin-lens: error: {e}", file=log)
        return 2
    if args.json:
        print(json.dumps(s, indent=1))
    else:
        print(report.format_summary(s))
        print(f"report: {s['report']} ({Path(s['report']).stat().st_size / 1e6:.1f} MB)")
    return 0


def _run(args: argparse.Namespace, sweep, attn, log) -> dict:
    """Load, analyse and write the report; the summary dict."""
    from lin_lens import report

    t0 = time.perf_counter()
    model = load(args.model, args.dtype, args.backend)
    t_load = time.perf_counter() - t0
    print(f"loaded {args.model} in {t_load:.1f}s", file=log)
    a = report.analyze(model, args.text, args.hooks, args.pos, ordinary=not args.no_ordinary,
                       sweep=sweep, attn_layers=attn, model_name=args.model,
                       progress=not args.no_progress, qk=args.qk_heads)
    t1 = time.perf_counter()
    path = report.write_report(a, args.out)
    t_write = time.perf_counter() - t1
    s = report.summary(a)
    s["report"] = str(path)
    s["timings_s"].update(load=round(t_load, 3), report=round(t_write, 3))
    return s


def _offline_by_default() -> None:
    """No network at run time unless the user says so: ``HF_HUB_OFFLINE=1`` unless set, also in
    huggingface_hub if ``import lin_lens`` already imported it (it reads the variable once)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    hub = sys.modules.get("huggingface_hub.constants")
    if hub is not None and os.environ["HF_HUB_OFFLINE"].strip().lower() not in ("", "0", "false"):
        setattr(hub, "HF_HUB_OFFLINE", True)  # noqa: B010 - a module constant, read once


def main(argv: list[str] | None = None) -> int:
    _offline_by_default()
    parser = build_parser()
    args = parser.parse_args(argv)
    if hasattr(args, "corpus_command"):
        return args.corpus_command(args, parser)
    if hasattr(args, "explorer_command"):
        return args.explorer_command(args, parser)
    if args.command == "analyze":
        return analyze_cmd(args, parser)
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
