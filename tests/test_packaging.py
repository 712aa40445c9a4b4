"""The package as a user gets it: ``python -m build`` makes a wheel that plain ``pip install``
puts into a fresh virtual environment, where the README's quickstart runs (issue 23).

The fresh environment gets its dependencies from the wheel's own metadata, installed by uv from
its cache (seconds), torch from pip's local wheel where pip is configured with one, as ``./dev``
does; then ``pip install dist/lin_lens-*.whl`` must find every requirement satisfied and install
the wheel alone. A dependency missing from the metadata therefore fails the quickstart. Without
uv, pip installs everything (minutes).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser
from importlib import metadata
from pathlib import Path

import pytest

from tests.conftest import cpu_only

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, cpu_only("builds and installs a wheel in subprocesses")]


def readme_quickstart() -> str:
    """The first ``python`` block of the README's Quickstart section."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("\n## Quickstart"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, **kw)
    assert r.returncode == 0, f"{cmd}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def uv() -> str | None:
    found = shutil.which("uv", path=str(Path(sys.executable).parent)) or shutil.which("uv")
    return found


def local_torch() -> str | None:
    """The torch wheel pip's own configuration offers (find-links), if any (as ./dev asks)."""
    for py in (sys.executable, str(Path(sys.base_prefix) / "bin" / "python3")):
        r = subprocess.run([py, "-m", "pip", "install", "--no-index", "--no-deps",
                            "--ignore-installed", "--dry-run", "--quiet", "--report", "-", "torch"],
                           capture_output=True, text=True, timeout=120)
        if r.returncode == 0:
            return json.loads(r.stdout)["install"][0]["download_info"]["url"]
    return None


def test_readme_quickstart_is_found():
    code = readme_quickstart()
    assert "lin_lens.linear_map" in code and "tiny_bridge" in code


def test_wheel_installs_with_pip_and_runs_the_quickstart(tmp_path):
    pytest.importorskip("build", reason="the test dependency group has build")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    uv_bin = uv()

    dist = tmp_path / "dist"
    installer = ["--installer", "uv"] if uv_bin else []
    run([sys.executable, "-m", "build", "--wheel", "--outdir", str(dist), *installer, str(ROOT)],
        env={**env, "PATH": f"{Path(uv_bin).parent}:{env['PATH']}"} if uv_bin else env)
    (wheel,) = dist.glob("lin_lens-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        meta = Parser().parsestr(z.read(next(n for n in names if n.endswith("METADATA")))
                                 .decode())
    assert {"lin_lens/py.typed", "lin_lens/corpus/phrases.txt"} <= names
    assert any(n.endswith("licenses/LICENSE") for n in names)
    assert meta["License-Expression"] == "MIT" and meta.get_all("Project-URL")
    requires = [r for r in meta.get_all("Requires-Dist") if "extra ==" not in r]

    venv = tmp_path / "venv"
    py = venv / "bin" / "python"
    torch_wheel = local_torch()
    if torch_wheel is None:  # the unpinned torch>=2.2 would fetch a CUDA build
        pytest.skip("pip has no local torch wheel (find-links): installing would download GBs")
    if uv_bin:
        run([uv_bin, "venv", "--seed", "--python", sys.executable, str(venv)], env=env)
        run([uv_bin, "pip", "install", "--python", str(py), torch_wheel], env=env)
        # the TransformerLens of this env (3.x in .venv/main, 4.x in .venv/tl4): the wheel is
        # tried on both
        pin = tmp_path / "constraints.txt"
        pin.write_text(f"transformer_lens=={metadata.version('transformer_lens')}\n")
        run([uv_bin, "pip", "install", "--python", str(py), "-c", str(pin), *requires], env=env)
    else:
        run([sys.executable, "-m", "venv", str(venv)], env=env)
        run([str(py), "-m", "pip", "install", "--no-deps", torch_wheel], env=env)
    r = run([str(py), "-m", "pip", "install", str(wheel)], env=env)
    if uv_bin:  # every requirement was already there: pip installed the wheel alone
        assert re.search(r"Successfully installed lin[-_]lens-\S+\s*$", r.stdout), r.stdout[-2000:]

    check = ("import importlib.metadata as m, pathlib, lin_lens\n"
             "assert m.version('lin_lens') == lin_lens.__version__\n"
             f"assert pathlib.Path(lin_lens.__file__).is_relative_to({str(venv)!r})\n")
    if uv_bin:
        tl = metadata.version("transformer_lens")
        check += f"assert m.version('transformer_lens') == {tl!r}\n"
    run([str(py), "-c", check + readme_quickstart()], cwd=tmp_path,
        env={**env, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "LIN_LENS_PROGRESS": "0"})
