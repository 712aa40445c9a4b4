"""Exact attribution graphs of heads and neurons (detached mode: nothing to train, no error nodes).

``lin_lens.graph.attribution_graph(model, prompt)`` → :class:`AttributionGraph`: nodes are the
input tokens, every constant origin, attention heads and MLP neurons by position, and the
target; edges are exact direct linear effects. Pruned as circuit-tracer prunes, saved in its
graph-file format (``save_json``), shown offline (``to_html``), checked by interventions
(:func:`ablate`).
"""

from lin_lens.graph.build import attribution_graph
from lin_lens.graph.intervene import Ablation, ablate
from lin_lens.graph.result import AttributionGraph

__all__ = ["Ablation", "AttributionGraph", "ablate", "attribution_graph"]
