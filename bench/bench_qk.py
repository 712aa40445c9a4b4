"""What QK attribution costs (issue 20, criterion 5), on SmolLM2-135M, float32, 2 CPU threads,
a 64-token prompt, the last query position over all keys. Interleaved repeats, one process:

* ``linear_map`` at ``ln_final.hook_normalized`` (d_model reverse rows): the yardstick;
* ``qk_attributions(by="tokens")`` for every head of every layer at once (one forward-mode pass
  per source token gives every query and key of every head);
* ``qk_attributions(by="nodes")`` for every head of one layer (cached forward values plus one
  batched backward pass through that layer's q/k path);
* ``attribution_graph(qk=False)`` against ``qk=True`` (heads and neurons, default pruning).

Ratios are printed against the yardstick and the qk=False graph measured in the same run.

    python bench/bench_qk.py                    # 2 repeats, 64 tokens
    python bench/bench_qk.py --n 32 --reps 1    # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("LIN_LENS_PROGRESS", "0")

import torch  # noqa: E402

import lin_lens  # noqa: E402

TEXT = ("The bridge out of Marin is the Golden Gate Bridge, which opened in 1937 and carries "
        "US 101 across the strait. Fog often covers its towers in summer, and the city of San "
        "Francisco lies at its southern end, while Sausalito and the Marin Headlands lie north. "
        "Visitors walk across it every day.")


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=64, help="prompt tokens")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--layer", type=int, default=18, help="layer for by='nodes'")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("THREADS", "2")))
    ap.add_argument("--no-graph", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = lin_lens.load_model("smollm2-135m", dtype=torch.float32)
    tokens = lin_lens.to_tokens(model, TEXT)[:, :args.n]
    assert tokens.shape[1] == args.n, f"the text has only {tokens.shape[1]} tokens"
    runs = {
        "linear_map (yardstick)": lambda: lin_lens.linear_map(
            model, tokens, "ln_final.hook_normalized", -1, progress=False),
        "qk by tokens, all layers and heads": lambda: lin_lens.qk_attributions(
            model, tokens, by="tokens", progress=False),
        f"qk by nodes, layer {args.layer}, all heads": lambda: lin_lens.qk_attributions(
            model, tokens, layers=[args.layer], by="nodes", progress=False),
    }
    if not args.no_graph:
        runs["graph qk=False"] = lambda: lin_lens.attribution_graph(model, tokens,
                                                                    progress=False)
        runs["graph qk=True"] = lambda: lin_lens.attribution_graph(model, tokens, qk=True,
                                                                   progress=False)
    # warm-up at 4 tokens (allocator, lazy imports)
    lin_lens.linear_map(model, tokens[:, :4], "ln_final.hook_normalized", -1, progress=False)
    times: dict[str, list[float]] = {k: [] for k in runs}
    notes: dict[str, str] = {}
    for rep in range(args.reps):
        for name, fn in runs.items():
            s, out = timed(fn)
            times[name].append(s)
            err = getattr(out, "relative_error", None)
            if isinstance(out, lin_lens.AttributionGraph):
                notes[name] = (f"{out.n_nodes} nodes, rel. error {out.relative_error:.1e}, "
                               f"qk heads {len(out.qk or {})}, qk_seconds "
                               f"{out.meta.get('qk_seconds', 0):.1f}")
            elif err is None and hasattr(out, "__len__"):
                worst = max(float(a.relative_error) for a in out)
                notes[name] = f"{len(out)} heads, worst rel. error {worst:.1e}"
            elif err is not None:
                notes[name] = f"rel. error {float(err):.1e}"
            print(f"rep {rep}: {name}: {s:.2f} s  {notes.get(name, '')}", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["linear_map (yardstick)"]
    print(f"\nSmolLM2-135M float32, {args.n} tokens, {args.threads} threads, medians of "
          f"{args.reps}:")
    for k, v in med.items():
        line = f"  {k:42s} {v:7.2f} s   ×{v / base:.2f} of linear_map"
        print(line + (f"   ({notes[k]})" if k in notes else ""))
    if "graph qk=True" in med:
        extra = med["graph qk=True"] / med["graph qk=False"] - 1
        print(f"  qk=True adds {100 * extra:.0f} % to the graph")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"n": args.n, "threads": args.threads, "times": times, "notes": notes},
                      fh, indent=1)


if __name__ == "__main__":
    main()
