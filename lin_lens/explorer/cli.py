"""``lin-lens serve DIR``, as a parser to add to ``lin-lens``'s own.

    lin-lens serve runs/                  # http://127.0.0.1:8000/
    lin-lens serve graphs/ --port 8765 --open
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from lin_lens.errors import LinLensError


def add_parsers(sub: Any) -> None:
    s = sub.add_parser(
        "serve", help="browse a folder of graphs, maps and corpus runs in the explorer",
        description="A small local web server (standard library) over DIR: an index of its "
                    "corpus runs, graph files (lin_lens's or circuit-tracer's JSON), saved "
                    ".pt maps and graphs and saved explorer pages, each opened in the explorer.")
    s.add_argument("dir", help="the folder to serve")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free one)")
    s.add_argument("--open", action="store_true", help="open the index in the default browser")
    s.set_defaults(explorer_command=serve_cmd)


def serve_cmd(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from lin_lens.explorer.serve import serve

    try:
        serve(args.dir, args.host, args.port, open_browser=args.open)
    except (LinLensError, OSError) as e:
        print(f"lin-lens serve: error: {e}", file=sys.stderr)
        return 2
    return 0
