"""Population views: stable rank by position (one colour per run), the comparison report (self
contained; rendered in headless Chromium when installed), and the two CLI sub-commands."""

from __future__ import annotations

import argparse
import html
import json
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest

from lin_lens import corpus
from lin_lens.corpus import LoadSpec, cli, views
from tests.conftest import cpu_only
from tests.corpus.conftest import DEFAULT_BACKEND, PROMPTS

pytestmark = cpu_only("corpus runs of CPU LoadSpec models, the CLI, Chromium")

BACKEND = DEFAULT_BACKEND


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for name in ("tiny-gpt2", "tiny-llama"):
        out[name] = corpus.run(LoadSpec(name, "float64", BACKEND), PROMPTS + [""], root / name,
                               progress=False)
    return out


def test_stable_rank_plot(runs):
    fig = views.stable_rank_plot(runs)
    ax = fig.axes[0]
    lines = ax.get_lines()
    assert len(lines) == 2 and lines[0].get_color() != lines[1].get_color()
    assert {t.get_text().split(":")[0] for t in ax.get_legend().get_texts()} == set(runs)
    # the line is the median stable rank at each position over the ok prompts
    rows = [r for r in corpus.read(runs["tiny-gpt2"]).to_pylist() if r["status"] == "ok"]
    x, y = lines[0].get_data()
    for i, v in zip(x, y, strict=True):
        vals = [r["stable_rank"][int(i)] for r in rows if len(r["stable_rank"]) > i]
        assert v == pytest.approx(float(np.median(vals)))
    assert list(x) == list(range(7))  # the longest prompt: BOS + 6 words


def test_summary_numbers(runs):
    t = corpus.read(runs["tiny-gpt2"])
    s = views.summary(t)
    assert (s["rows"], s["ok"], s["failed"]) == (6, 5, 1)
    ok = [r for r in t.to_pylist() if r["status"] == "ok"]
    share = np.mean([r["prediction_id"] in r["u_stacked_ids"][0] for r in ok])
    assert s["u0_top5_share"] == pytest.approx(share)
    assert s["error_max"] < 1e-12


@pytest.fixture(scope="module")
def report(runs, tmp_path_factory):
    return views.compare(*runs.values(), out=tmp_path_factory.mktemp("rep") / "c.html",
                         labels=list(runs))


def test_report_is_self_contained(report, runs):
    h = report.read_text(encoding="utf-8")
    assert "<script" not in h and not re.search(r"(src|href)=['\"](https?:)?//", h)
    assert h.count("data:image/png;base64,") == 2
    for label in runs:
        assert h.count(f"<th>{label}: prediction</th>") == 1
    r = corpus.read(runs["tiny-llama"]).to_pylist()[0]
    for tok in r["u_stacked_tokens"][2]:  # U₂ of the first prompt, each token shown
        assert f"<code>{html.escape(tok)}</code>" in h
    assert h.count("<i>error</i>") == 2  # the failing prompt, in both runs


CHROMIUM = next((p for p in (shutil.which("chromium"), shutil.which("chromium-browser"),
                             shutil.which("google-chrome")) if p), None)


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium not installed (apt-get install chromium)")
def test_report_in_headless_chromium(report, tmp_path):
    netlog, shot = tmp_path / "net.json", tmp_path / "shot.png"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
           f"--log-net-log={netlog}", "--host-resolver-rules=MAP * ~NOTFOUND",
           "--window-size=1200,1600", f"--screenshot={shot}", report.as_uri()]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stderr[-2000:]
    assert [ln for ln in p.stderr.splitlines() if ":CONSOLE" in ln] == []
    d = json.loads(netlog.read_text())
    start = d["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    urls = [e["params"]["url"] for e in d["events"]
            if e["type"] == start and "url" in (e.get("params") or {})
            and e["params"].get("initiator") != "not an origin"
            and urlparse(e["params"]["url"]).scheme not in ("file", "data", "about", "chrome")]
    assert urls == []
    import matplotlib.image

    img = matplotlib.image.imread(shot)[..., :3]
    assert float(np.std(img)) > 0.05  # not blank
    assert float((img.max(-1) - img.min(-1) > 0.3).mean()) > 1e-3  # the coloured plots


def _parser():
    p = argparse.ArgumentParser(prog="lin-lens")
    cli.add_parsers(p.add_subparsers(dest="command", required=True))
    return p


def test_cli_corpus_and_compare(tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("w1 w2 w3\nw4 w5\n")
    common = ["--model", "tiny-gpt2", "--dtype", "float64", "--backend", BACKEND,
              "--no-progress"]
    for name in ("a", "b"):
        assert cli.main(["corpus", str(prompts), "--out", str(tmp_path / name), *common,
                         "--analyses", "svd,decode", "--pos", "-1", "--pos", "1"]) == 0
        assert "4 rows (4 ok, 0 failed)" in capsys.readouterr().out
    assert corpus.read(tmp_path / "a")["target_pos"].to_pylist() == [1, 3, 1, 2]
    out = tmp_path / "c.html"
    assert cli.main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out),
                     "--label", "A", "--label", "B", "--png", str(tmp_path / "f.png")]) == 0
    assert out.exists() and (tmp_path / "f.png").stat().st_size > 1000
    assert "report:" in capsys.readouterr().out


@pytest.mark.parametrize("argv, msg", [
    (["corpus", "missing.txt", "--out", "x", "--model", "tiny-gpt2"], "does not exist"),
    (["corpus", "phrases", "--out", "x", "--model", "tiny-nope"], "family 'nope'"),
    (["compare", "nowhere"], "no lin_lens corpus run"),
])
def test_cli_errors_are_one_line(argv, msg, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_parser_wires_into_lin_lens():
    args = _parser().parse_args(["compare", "a", "b"])
    assert args.corpus_command is cli.compare_cmd and args.out == Path("compare.html")
