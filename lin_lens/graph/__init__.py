"""Exact attribution graphs of heads and neurons (detached mode: nothing to train, no error nodes).

``lin_lens.graph.attribution_graph(model, prompt)`` → :class:`AttributionGraph`: nodes are the
input tokens, every constant origin, attention heads and MLP neurons by position, and the
target; edges are exact direct linear effects. Pruned as circuit-tracer prunes (again at other
thresholds with ``pruned``), saved in its graph-file format (``save_json``), read in the circuit
explorer (``show``, ``save_html``; :func:`load_json` opens circuit-tracer's files too), checked
by interventions (:func:`ablate`).
"""

from lin_lens.graph.build import attribution_graph
from lin_lens.graph.intervene import Ablation, ablate
from lin_lens.graph.jsonfile import load_json
from lin_lens.graph.result import AttributionGraph
from lin_lens.graph.sparse import SparseGraph
from lin_lens.graph.writes import node_writes

__all__ = ["Ablation", "AttributionGraph", "SparseGraph", "ablate", "attribution_graph",
           "load_json", "node_writes"]
