"""The analysis behind the report, the plots, the self-contained HTML, and the page in headless
Chromium (rendered, no console messages, no network request, non-blank screenshot)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlparse

import matplotlib.image
import numpy as np
import pytest
import torch

from lin_lens import display, linear_map, report
from lin_lens._numeric import relative_error
from lin_lens.display import plots
from lin_lens.errors import UnknownHookError
from lin_lens.maps import ordinary_reconstruction
from tests.conftest import tiny

TEXT = "w1 w2 w3 w4 w5"
# Ordinary (undetached) reconstructions compare with the Bridge's plain forward, where HF's
# RMSNorm computes in float32 (README, "TransformerBridge forward values").
ORDINARY_TOL = {"hooked": 1e-10, "bridge": 1e-5}


@pytest.fixture(scope="module")
def model(backend):
    return tiny("gpt2", backend, tokenizer=True)


@pytest.fixture(scope="module")
def result(model):
    return report.analyze(model, TEXT, ["ln_final.hook_normalized", "blocks.0.hook_resid_post"],
                          sweep=True, attn_layers=[0, 1], model_name="tiny-gpt2", qk=[(1, 2)])


@pytest.fixture(scope="module")
def html_path(result, tmp_path_factory):
    return report.write_report(result, tmp_path_factory.mktemp("rep") / "report.html")


# -- analysis -----------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["gpt2", "llama", "gemma"])
def test_ordinary_reconstruction_matches_full_ordinary_jacobian(arch, backend):
    m, tol = tiny(arch, backend), ORDINARY_TOL[backend]
    tok = torch.tensor([[1, 5, 7, 9, 3]])
    h = "ln_final.hook_normalized"
    full = linear_map(m, tok, h, -1, detach=False, check=False).reconstruct()
    fast = ordinary_reconstruction(m, tok, h, -1)
    assert relative_error(full, fast) < tol
    # and it is far from the output, unlike the detached map
    assert relative_error(linear_map(m, tok, h, -1).act, fast) > 1e-2


def test_summary(result, model):
    s = report.summary(result)
    json.dumps(s)  # JSON-serialisable
    assert s["tokens"] == display.str_tokens(model, model.to_tokens(TEXT))
    for h in ("ln_final.hook_normalized", "blocks.0.hook_resid_post"):
        d = s["hooks"][h]
        assert d["relative_error"] < 1e-12 < 1e-3 < d["relative_error_ordinary"]
        assert len(d["stable_rank"]) == len(s["tokens"])
        assert all(1 - 1e-9 <= x <= 16 for x in d["stable_rank"])
        assert len(d["decoded"]["U"][0]) == 5
    p = s["predicted_logit"]
    assert p["token"] == s["prediction"][0]["token"]
    assert sum(p["contributions"]) + p["constant"] == pytest.approx(p["logit"], abs=1e-3)
    assert s["sweep"]["layers"] == [0, 1]
    txt = report.format_summary(s)
    assert "relative error" in txt and repr(p["token"]) in txt


def test_bad_position_and_hook(model):
    with pytest.raises(IndexError):
        report.analyze(model, TEXT, pos=40)
    with pytest.raises(UnknownHookError, match="Did you mean"):
        report.analyze(model, TEXT, ["blocks.0.hook_resid_pots"])
    with pytest.raises(ValueError, match="d_vocab rows"):
        report.analyze(model, TEXT, ["logits"])
    with pytest.raises(ValueError, match="vector-valued"):
        report.analyze(model, TEXT, ["blocks.0.attn.hook_z"])


# -- plots --------------------------------------------------------------------------------------

def test_plots(result):
    r = result.hooks["ln_final.hook_normalized"]
    fig = plots.reconstruction_scatter(r.lm, r.ordinary)
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert any(t.startswith("detached") for t in labels)
    assert any(t.startswith("ordinary") for t in labels)
    errs = [float(re.search(r"rel\. err\. ([0-9.e+-]+)", t).group(1)) for t in labels[:2]]
    assert errs[0] < 1e-12 and errs[1] > 1e-3
    fig = plots.singular_spectra(result.spectra["ln_final.hook_normalized"], result.str_tokens)
    assert len(fig.axes[0].get_lines()) == len(result.str_tokens)
    sw = result.sweep
    fig = plots.stable_rank_curves(sw.stacked_stable_rank, sw.layers)
    assert len(fig.axes[0].get_lines()) == len(sw.stacked_stable_rank)
    fig = plots.projection_trajectory(sw.proj_u["resid_post"], sw.layers)
    ys = fig.axes[0].get_lines()[0].get_ydata()
    assert ys[-1] == pytest.approx(1.0)  # the final layer against itself
    png = plots.to_png_base64(fig)
    assert png.startswith("iVBOR")


# -- the HTML file ------------------------------------------------------------------------------

def test_report_is_self_contained(html_path):
    h = html_path.read_text(encoding="utf-8")
    bundle = display.bundle_js()
    assert h.count(bundle[:300]) == 1  # the CircuitsVis bundle exactly once
    ours = h.replace(bundle, "")
    n_calls = ours.count("CircuitsVis.render(")
    # logit tokens, 2 hooks × (contributions + topk), sweep topk, attention (2 layers)
    assert n_calls == 1 + 2 * 2 + 1 + 2 + 3  # + one QK head: pairs, scores, pattern
    assert ours.count('<div id="circuits-vis-') == n_calls
    assert not re.search(r"<(script|link|img|iframe)[^>]+(src|href)=\"(https?:)?//", ours)
    assert "unpkg" not in ours and "@import" not in ours
    assert ours.count("data:image/png;base64,") == 2 * 2 + 2 + 1
    assert h.count("</script>") == 1


# -- headless Chromium --------------------------------------------------------------------------

CHROMIUM = next((p for p in (shutil.which("chromium"), shutil.which("chromium-browser"),
                             shutil.which("google-chrome")) if p), None)
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="Chromium not installed (apt-get install chromium)")


def _chromium(page: Path, tmp: Path, *extra: str) -> tuple[str, str, Path]:
    """Run headless Chromium on ``page``; return (stdout, stderr, netlog path)."""
    netlog = tmp / f"net{len(list(tmp.iterdir()))}.json"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp / 'profile'}", "--enable-logging=stderr", "--v=0",
           f"--log-net-log={netlog}", "--host-resolver-rules=MAP * ~NOTFOUND",
           "--virtual-time-budget=10000", "--window-size=1200,2000", *extra, page.as_uri()]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stderr[-2000:]
    return p.stdout, p.stderr, netlog


def _console(stderr: str) -> list[str]:
    # every console message (console.log/warn/error, uncaught exceptions) of the page
    return [ln for ln in stderr.splitlines() if ":CONSOLE" in ln]


def _page_requests(netlog: Path) -> list[str]:
    """URLs the page asked for over the network. The browser's own background requests
    (initiator 'not an origin') are left out; file:/data:/blob: loads are local."""
    d = json.loads(netlog.read_text())
    start = d["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    urls = []
    for e in d["events"]:
        p = e.get("params") or {}
        if e["type"] != start or "url" not in p:
            continue
        if p.get("initiator") == "not an origin":
            continue
        if urlparse(p["url"]).scheme in ("file", "data", "blob", "about", "chrome"):
            continue
        urls.append(p["url"])
    return urls


@needs_chromium
def test_checker_can_fail(tmp_path):
    """The console and network checks catch an external image and an error."""
    page = tmp_path / "bad.html"
    page.write_text("<!doctype html><img src='https://example.com/x.png'>"
                    "<script>console.error('boom')</script>")
    _, err, netlog = _chromium(page, tmp_path, "--dump-dom")
    assert any("boom" in ln for ln in _console(err))
    assert _page_requests(netlog) == ["https://example.com/x.png"]


@needs_chromium
def test_report_in_headless_chromium(html_path, tmp_path):
    dom, err, netlog = _chromium(html_path, tmp_path, "--dump-dom")
    assert _console(err) == []
    assert _page_requests(netlog) == []
    # every CircuitsVis container was filled by React
    ids = re.findall(r'<div id="(circuits-vis-[^"]+)"', html_path.read_text(encoding="utf-8"))
    assert ids
    for i in ids:
        m = re.search(rf'<div id="{i}"[^>]*>(.*?)</div>', dom, re.S)
        assert m and len(m.group(1)) > 50, f"{i} not rendered"
    shot = tmp_path / "shot.png"
    _, err2, netlog2 = _chromium(html_path, tmp_path, f"--screenshot={shot}")
    assert _console(err2) == [] and _page_requests(netlog2) == []
    img = matplotlib.image.imread(shot)
    assert img.shape[0] >= 1000 and img.shape[1] >= 1000
    assert float(np.std(img[..., :3])) > 0.05  # not blank
    # coloured pixels (the token colours and plot markers), not only black text on white
    rgb = img[..., :3]
    assert float((rgb.max(-1) - rgb.min(-1) > 0.3).mean()) > 1e-3
