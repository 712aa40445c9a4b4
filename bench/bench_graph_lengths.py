"""How ``attribution_graph`` grows with the prompt (issue 24, criteria 2 and 3): SmolLM2-135M
float32, heads and neurons, default pruning, at n tokens; each length in its own subprocess, so
each gets its own peak RSS.

    python bench/bench_graph_lengths.py --n 8,32,128,512 --qk          # the table in BENCHMARKS.md
    python bench/bench_graph_lengths.py --n 8 --backend bridge         # the same on a Bridge
    python bench/bench_graph_lengths.py one 128 --qk                   # one child, JSON on stdout
    python3 bench/bench_graph_lengths.py --random smollm2-135m --device cuda --n 128,512,1024
        # a GPU without the weights: the same config, random weights (bench/paper_scale.py)

Per length: graph seconds (``graph.meta["seconds"]``, pruning and exact rows), the QK section's
seconds (``qk=True``), the rows computed, candidate and kept nodes, kept edges, the target's and
the nodes' relative errors, peak RSS and RSS after loading, the batch the graph ran at.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("LIN_LENS_PROGRESS", "0")

import torch  # noqa: E402

# A plain English paragraph, repeated to the length asked (BOS + n - 1 tokens).
TEXT = ("The bridge out of Marin is the Golden Gate, which opened in 1937 and carries about "
        "one hundred thousand cars a day across the strait between San Francisco Bay and the "
        "Pacific Ocean. Its towers are painted international orange so that ships can see them "
        "in the fog that rolls in from the sea on summer afternoons. ")


def _random(name: str, device: str):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from bench.paper_scale import CONFIGS, build

    return build(name, CONFIGS[name]["num_hidden_layers"], device, torch.float32)[0]


def child(n: int, qk: bool, backend: str, random: str | None = None, device: str = "cpu"
          ) -> dict:
    import resource
    import warnings

    warnings.filterwarnings("ignore")
    import lin_lens
    from lin_lens.graph import attribution_graph

    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    if random:
        model = _random(random, device)
        ids = torch.randint(1, model.cfg.d_vocab, (1, n), generator=torch.Generator()
                            .manual_seed(0)).to(device)
        backend = "bridge"
    else:
        model = lin_lens.load_model("smollm2-135m", dtype=torch.float32, backend=backend)
        ids = model.to_tokens(TEXT * (1 + n // 40), prepend_bos=True)[:, :n]
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    assert ids.shape[1] == n, ids.shape
    rss_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t = time.perf_counter()
    g = attribution_graph(model, ids, qk=qk)
    wall = time.perf_counter() - t
    errs = g.node_errors()
    return {
        "n": n, "backend": backend, "qk": qk, "wall_seconds": round(wall, 2),
        "graph_seconds": g.meta["seconds"], "qk_seconds": g.meta.get("qk_seconds"),
        "rows": g.meta["rows_computed"], "candidates": g.meta["n_candidates"],
        "batch": g.meta.get("batch_size"), "nodes": g.n_nodes, "edges": g.n_edges,
        "relative_error": g.relative_error, "node_errors": errs,
        "rss_after_load_gib": round(rss_load / 2**30, 2),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "target": g.summary().get("target"), "model": random or "smollm2-135m",
        "device": device,
        "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
    }


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "one":
        ap = argparse.ArgumentParser()
        ap.add_argument("one")
        ap.add_argument("n", type=int)
        ap.add_argument("--qk", action="store_true")
        ap.add_argument("--backend", default="hooked")
        ap.add_argument("--random", default=None)
        ap.add_argument("--device", default="cpu")
        a = ap.parse_args()
        print(json.dumps(child(a.n, a.qk, a.backend, a.random, a.device), default=str))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", default="8,32,128,512")
    ap.add_argument("--qk", action="store_true")
    ap.add_argument("--backend", default="hooked")
    ap.add_argument("--random", default=None,
                    help="a bench/paper_scale.py config with random weights (a Bridge)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--timeout", type=float, default=None, help="seconds per length")
    ap.add_argument("--json", default=None, help="append each result to this JSON-lines file")
    a = ap.parse_args()
    for n in (int(v) for v in a.n.split(",")):
        cmd = [sys.executable, __file__, "one", str(n), "--backend", a.backend,
               "--device", a.device] + (["--random", a.random] if a.random else [])
        if a.qk:
            cmd.append("--qk")
        t = time.perf_counter()
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout)
        except subprocess.TimeoutExpired:
            print(json.dumps({"n": n, "timeout": a.timeout}), flush=True)
            break
        if p.returncode:
            res = {"n": n, "backend": a.backend, "qk": a.qk, "failed": p.returncode,
                   "seconds": round(time.perf_counter() - t, 1),
                   "stderr": p.stderr.strip().splitlines()[-3:]}
        else:
            res = json.loads(p.stdout.strip().splitlines()[-1])
        print(json.dumps(res), flush=True)
        if a.json:
            with open(a.json, "a") as f:
                f.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()
