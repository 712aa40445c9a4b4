"""The circuit explorer: attribution graphs, linear maps and corpus runs, read in the browser.

One page style, three places: in a notebook (``graph.show()``, or the graph as a cell's
output), as one self-contained file (``graph.save_html(path)``; it works from ``file://`` with
no network) and from a local server over a folder (``lin-lens serve DIR``, :func:`serve`).

* graphs: ``AttributionGraph.show`` / ``save_html`` / ``to_html``, and
  :func:`lin_lens.graph.load_json` for circuit-tracer's graph files (:mod:`lin_lens.graph.view`);
* maps: :func:`map_page`, :func:`save_map_html`, :func:`show_map` for a :class:`LinearMap`;
* corpus runs: :func:`corpus_page`, :func:`save_corpus_html` (a folder of static pages);
* :func:`serve`: the index of a folder, each item opened in the explorer.
"""

from lin_lens.explorer.corpus import corpus_data, corpus_page, save_corpus_html
from lin_lens.explorer.maps import map_data, map_page, row_data, save_map_html, show_map
from lin_lens.explorer.serve import make_server, serve
from lin_lens.graph.view import explorer_data as graph_data
from lin_lens.graph.view import graph_page

__all__ = ["corpus_data", "corpus_page", "graph_data", "graph_page", "make_server", "map_data",
           "map_page", "row_data", "save_corpus_html", "save_map_html", "serve", "show_map"]
