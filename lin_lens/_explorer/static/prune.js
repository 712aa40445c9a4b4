/* Re-pruning in the page: lin_lens/graph/reprune.py's rule, step for step (circuit-tracer's
   influence pruning, as lin_lens/graph/prune.py implements it), on edge lists.

   1. Â = |A| row-normalised over each receiver's incoming edges; influence = w (Â + Â² + …)
      with w the targets' weights; keep nodes whose influence reaches findThreshold at the node
      threshold, and the "always" nodes (token embeddings, targets).
   2. On the kept sub-graph: Â again, scores Â[dst,src]·(infl(dst) + w(dst)) kept while they
      reach the edge threshold (all absent entries count as zeros, one zero stands for them);
      then drop nodes without an outgoing edge (receivers also without an incoming one) until
      nothing changes.
   Also the strongest paths from a node to the targets (as AttributionGraph.top_paths scores
   them: the product of each edge's share of its receiver's incoming |edges|, times the
   target's weight). */
var LL = window.LL = window.LL || {};
(function (LL) {
  "use strict";

  function rowNormalized(n, dst, absw, list) {
    var rows = new Float64Array(n), a = new Float64Array(list.length), k, e;
    for (k = 0; k < list.length; k++) { e = list[k]; rows[dst[e]] += absw[e]; }
    for (k = 0; k < list.length; k++) { e = list[k]; a[k] = absw[e] / Math.max(rows[dst[e]], 1e-30); }
    return a;
  }

  /* w (Â + Â² + …): the power series, stopped when a power vanishes (a DAG ends) */
  function influence(n, src, dst, list, a, w) {
    var prod = Float64Array.from(w), total = new Float64Array(n), it, k, i;
    for (it = 0; it < 10000; it++) {
      var next = new Float64Array(n), any = false;
      for (k = 0; k < list.length; k++) {
        var v = prod[dst[list[k]]] * a[k];
        if (v !== 0) next[src[list[k]]] += v;
      }
      for (i = 0; i < n; i++) if (next[i] !== 0) { any = true; break; }
      if (!any) return total;
      for (i = 0; i < n; i++) total[i] += next[i];
      prod = next;
    }
    throw new Error("influence did not converge in 10000 steps (the graph has a cycle?)");
  }

  /* the score at which the sorted scores' cumulative share first reaches threshold */
  function findThreshold(scores, threshold) {
    var s = Float64Array.from(scores).sort().reverse(), total = 0, i;
    for (i = 0; i < s.length; i++) total += s[i];
    if (!(total > 0)) return Infinity;
    var cum = 0;
    for (i = 0; i < s.length; i++) {
      cum += s[i];
      if (cum / total >= threshold) return s[i];
    }
    return s[s.length - 1];
  }

  /* {node: Uint8Array(n), edge: Uint8Array(m)} of G pruned at the two thresholds */
  function prune(G, nodeThreshold, edgeThreshold) {
    var n = G.n, m = G.m, src = G.src, dst = G.dst, absw = G.absw, tw = G.tw;
    var all = new Int32Array(m), i, k, e;
    for (e = 0; e < m; e++) all[e] = e;
    var infl = influence(n, src, dst, all, rowNormalized(n, dst, absw, all), tw);
    var tn = findThreshold(infl, nodeThreshold), node = new Uint8Array(n);
    for (i = 0; i < n; i++) node[i] = (infl[i] >= tn || G.always[i]) ? 1 : 0;
    var subList = [];
    for (e = 0; e < m; e++) if (node[src[e]] && node[dst[e]]) subList.push(e);
    var sub = Int32Array.from(subList), a = rowNormalized(n, dst, absw, sub);
    var infl2 = influence(n, src, dst, sub, a, tw), score = new Float64Array(sub.length + 1);
    for (k = 0; k < sub.length; k++) { e = sub[k]; score[k] = a[k] * (infl2[dst[e]] + tw[dst[e]]); }
    var te = findThreshold(score, edgeThreshold), kept = new Uint8Array(sub.length);
    for (k = 0; k < sub.length; k++) kept[k] = (score[k] >= te && G.w[sub[k]] !== 0) ? 1 : 0;
    for (;;) {
      var hasOut = new Uint8Array(n), hasIn = new Uint8Array(n), changed = false;
      for (k = 0; k < sub.length; k++) if (kept[k]) { hasOut[src[sub[k]]] = 1; hasIn[dst[sub[k]]] = 1; }
      for (i = 0; i < n; i++) {
        if (!node[i]) continue;
        var ok = G.always[i] || (hasOut[i] && (!G.receiver[i] || hasIn[i]));
        if (!ok) { node[i] = 0; changed = true; }
      }
      for (k = 0; k < sub.length; k++) if (kept[k] && !(node[src[sub[k]]] && node[dst[sub[k]]])) kept[k] = 0;
      if (!changed) break;
    }
    var edge = new Uint8Array(m);
    for (k = 0; k < sub.length; k++) if (kept[k]) edge[sub[k]] = 1;
    return {node: node, edge: edge};
  }

  /* A topological rank of the nodes (Kahn's algorithm); null if the edges hold a cycle. */
  function topoRank(G) {
    var n = G.n, indeg = new Int32Array(n), rank = new Int32Array(n), queue = [], i, k, r = 0;
    for (var e = 0; e < G.m; e++) indeg[G.dst[e]]++;
    for (i = 0; i < n; i++) if (!indeg[i]) queue.push(i);
    for (var h = 0; h < queue.length; h++) {
      var u = queue[h];
      rank[u] = r++;
      for (k = G.outStart[u]; k < G.outStart[u + 1]; k++) {
        var d = G.dst[G.outList[k]];
        if (--indeg[d] === 0) queue.push(d);
      }
    }
    return r === n ? rank : null;
  }

  /* Paths: the K strongest from a node to the targets over the shown edges, memoised per
     pruning state (a node's best paths do not depend on where the search started). */
  function Paths(G, shown, K) {
    this.G = G; this.shown = shown; this.K = K || 3; this.memo = new Map();
    var share = new Float64Array(G.m), rows = new Float64Array(G.n), e;
    for (e = 0; e < G.m; e++) if (shown.edge[e]) rows[G.dst[e]] += G.absw[e];
    for (e = 0; e < G.m; e++) if (shown.edge[e]) share[e] = G.absw[e] / Math.max(rows[G.dst[e]], 1e-300);
    this.share = share;
  }
  Paths.prototype.from = function (v) {
    var G = this.G, shown = this.shown, memo = this.memo, K = this.K, share = this.share;
    var seen = new Set([v]), stack = [v], todo = [], k, e;
    while (stack.length) {
      var u = stack.pop();
      if (memo.has(u)) continue;
      todo.push(u);
      for (k = G.outStart[u]; k < G.outStart[u + 1]; k++) {
        e = G.outList[k];
        if (shown.edge[e] && !seen.has(G.dst[e])) { seen.add(G.dst[e]); stack.push(G.dst[e]); }
      }
    }
    todo.sort(function (a, b) { return G.rank[b] - G.rank[a]; });  /* sinks first */
    todo.forEach(function (u) {
      var cands = [];
      if (G.tw[u] > 0) cands.push({s: G.tw[u], next: -1, j: -1, e: -1});
      for (var q = G.outStart[u]; q < G.outStart[u + 1]; q++) {
        var ed = G.outList[q];
        if (!shown.edge[ed]) continue;
        var best = memo.get(G.dst[ed]) || [];
        for (var j = 0; j < best.length; j++) cands.push({s: share[ed] * best[j].s, next: G.dst[ed], j: j, e: ed});
      }
      cands.sort(function (a, b) { return b.s - a.s; });
      memo.set(u, cands.slice(0, K));
    });
    return (memo.get(v) || []).map(function (c) {
      var nodes = [v], edges = [], cur = c;
      while (cur.next >= 0) { edges.push(cur.e); nodes.push(cur.next); cur = memo.get(cur.next)[cur.j]; }
      return {score: c.s, nodes: nodes, edges: edges};
    });
  };

  LL.prune = {prune: prune, influence: influence, findThreshold: findThreshold,
    rowNormalized: rowNormalized, topoRank: topoRank, Paths: Paths};
})(LL);
