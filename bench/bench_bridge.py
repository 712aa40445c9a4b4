"""TransformerBridge against HookedTransformer on the same model, prompt and machine (issue 26):
``layer_sweep`` (default kinds), one ``linear_map`` at ``ln_final.hook_normalized``, and with
``--what`` also an ``attribution_graph`` (heads and neurons, default pruning) and a corpus run
(``lin_lens.corpus.run`` over the first 10 shipped phrases, default rows), SmolLM2-135M float32,
2 threads, the backends alternating within each repeat; the engine each one chose.

    python bench/bench_bridge.py                  # 3 repeats of the sweep and the map
    python bench/bench_bridge.py --what graph,corpus --reps 3
    python bench/bench_bridge.py --reps 1 --json bench/results/bridge.json
    python bench/bench_bridge.py --stages         # where the time goes: the sweep's stages
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("LIN_LENS_PROGRESS", "0")

import torch  # noqa: E402

import lin_lens  # noqa: E402

TEXT = "The bridge out of Marin is the"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    ap.add_argument("--what", default="layer_sweep,linear_map",
                    help="comma-separated: layer_sweep, linear_map, graph, corpus")
    ap.add_argument("--stages", action="store_true",
                    help="time the sweep's stages instead (one run each)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    models = {b: lin_lens.load_model("smollm2-135m", dtype=torch.float32, backend=b)
              for b in ("hooked", "bridge")}
    if args.stages:
        return stages(models)
    from lin_lens import corpus
    from lin_lens.graph import attribution_graph

    phrases = corpus.load_prompts("phrases")[:10]
    every = {
        "layer_sweep": lambda m: lin_lens.layer_sweep(m, TEXT, progress=False),
        "linear_map": lambda m: lin_lens.linear_map(m, TEXT, "ln_final.hook_normalized", -1,
                                                    progress=False),
        "graph": lambda m: attribution_graph(m, TEXT, progress=False),
        "corpus": lambda m: corpus.run(m, phrases, tempfile.mkdtemp(prefix="lin_lens_bridge_"),
                                       progress=False),
    }
    runs = {r: every[r] for r in args.what.split(",")}
    for m in models.values():  # warm-up (allocator, lazy imports, the Bridge's first hooks)
        lin_lens.linear_map(m, TEXT[:12], "ln_final.hook_normalized", -1, progress=False)
    times: dict[str, list[float]] = {f"{r} {b}": [] for r in runs for b in models}
    notes: dict[str, str] = {}
    for rep in range(args.reps):
        for r, fn in runs.items():
            for b, m in models.items():
                t = time.perf_counter()
                out = fn(m)
                s = time.perf_counter() - t
                times[f"{r} {b}"].append(s)
                if isinstance(out, lin_lens.LinearMap):
                    notes[f"{r} {b}"] = (f"engine {out.meta.get('engine', 'reverse')}, "
                                         f"rel. error {out.relative_error:.1e}")
                elif isinstance(out, str):  # the corpus run's output directory
                    notes[f"{r} {b}"] = f"{len(phrases)} prompts"
                elif hasattr(out, "node_errors"):
                    notes[f"{r} {b}"] = (f"{out.n_nodes} nodes, {out.n_edges} edges, rel. error "
                                         f"{max(out.node_errors().values()):.1e}")
                else:
                    worst = max(float(e.max()) for e in out.relative_error.values())
                    notes[f"{r} {b}"] = f"worst rel. error {worst:.1e}"
                print(f"rep {rep}: {r} {b}: {s:.1f} s  {notes[f'{r} {b}']}", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\nSmolLM2-135M float32, {args.threads} threads, medians of {args.reps}:")
    for r in runs:
        h, b = med[f"{r} hooked"], med[f"{r} bridge"]
        print(f"  {r:12s} hooked {h:7.1f} s   bridge {b:7.1f} s   bridge / hooked {b / h:.2f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"threads": args.threads, "times": times, "notes": notes}, fh, indent=1)


def stages(models: dict) -> None:
    """The layer sweep's stages on each backend: its 90 cumulative operators (engine auto), its
    30 layer transforms, and 18 of the operators by graph/replay columns and by reverse rows."""
    from lin_lens.maps import layer_sweep_hooks

    for b, m in models.items():
        hooks = layer_sweep_hooks(m)
        some = [h for h in hooks if int(h.split(".")[1]) in (0, 6, 12, 18, 24, 29)]
        ops = lin_lens.operators_at_hooks
        calls = [
            (f"{len(hooks)} cumulative operators, engine auto", ops, (m, TEXT, hooks, -1), {}),
            ("30 layer transforms", lin_lens.layer_transforms, (m, TEXT), {}),
            (f"{len(some)} operators, engine forward", ops, (m, TEXT, some, -1),
             {"engine": "forward"}),
            (f"{len(some)} operators, engine reverse", ops, (m, TEXT, some, -1),
             {"engine": "reverse"}),
        ]
        for name, fn, a, kw in calls:
            t = time.perf_counter()
            out = fn(*a, progress=False, **kw)
            engines = sorted({str(x.meta.get("engine", "reverse")) for x in out.values()})
            print(f"{b}: {name}: {time.perf_counter() - t:.1f} s  ({', '.join(engines)})",
                  flush=True)


if __name__ == "__main__":
    main()
