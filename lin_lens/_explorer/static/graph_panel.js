/* The node panel: label, value, total effect, what the node writes (decoded tokens), a head's
   QK attribution (Neuronpedia's qk_tracing_results), incoming and outgoing edges by |weight|
   (each clickable; edges hidden by the thresholds greyed), and the pinned subgraph. */
var LL = window.LL = window.LL || {};
(function (LL) {
  "use strict";
  var el = LL.el, SHOW = 25;

  function sortedEdges(G, start, list, i) {
    var out = [];
    for (var k = start[i]; k < start[i + 1]; k++) out.push(list[k]);
    out.sort(function (a, b) { return (G.absw[b] - G.absw[a]) || (a - b); });
    return out;
  }

  function edgeList(view, edges, other, cls) {
    var G = view.G, ul = el("ul", {class: "ll-edges " + cls}), max = 0;
    edges.forEach(function (e) { max = Math.max(max, G.absw[e]); });
    function add(from, to) {
      for (var q = from; q < to; q++) {
        var e = edges[q], j = other[e];
        var li = el("li", {"data-node": j, "data-edge": e, class: view.shown.edge[e] ? null : "off",
          title: G.id[j], onclick: (function (jj) { return function () { view.select(jj, true); }; })(j)},
          [el("span", {class: "lab"}, G.label[j]), el("span", {class: "w"}, LL.signed(G.w[e])),
           el("span", {class: "bar", style: {width: Math.max(2, 60 * G.absw[e] / (max || 1)) + "px",
             background: G.w[e] < 0 ? "#d06060" : "#5a86d0"}})]);
        ul.appendChild(li);
      }
    }
    add(0, Math.min(SHOW, edges.length));
    var box = el("div", null, [ul]);
    if (edges.length > SHOW) {
      var more = el("button", {onclick: function () { add(SHOW, edges.length); more.remove(); }},
        "show all " + edges.length);
      box.appendChild(more);
    }
    return box;
  }

  function qkName(view, id) {
    var G = view.G, j = G.idIndex.get(id);
    if (j !== undefined) {
      return el("span", {class: "ll-link", onclick: function () { view.select(j, true); }}, G.label[j]);
    }
    var q = (view.data.qk_only_nodes || {})[id];
    var text = q ? (q.label || q.clerp || id) + (q.layer !== undefined ? " (L" + q.layer + "@" + q.ctx_idx + ")" : "") : id;
    return el("span", {class: "ll-muted", title: "not a node of this graph: " + id}, text);
  }

  function qkSection(view, qk) {
    var box = el("div", {class: "ll-qk"});
    var pairs = qk.pair_wise_contributors || [], qs = qk.top_q_marginal_contributors || [];
    var ks = qk.top_k_marginal_contributors || [];
    function tbl(head, rows, render) {
      var t = el("table", {class: "ll-table"}, [el("tr", null, head.map(function (h) { return el("th", null, h); }))]);
      rows.forEach(function (r) { t.appendChild(el("tr", null, render(r).map(function (c) {
        return el("td", {class: typeof c === "string" ? "num" : null}, c); }))); });
      return t;
    }
    if (pairs.length) {
      box.appendChild(el("div", {class: "ll-muted"}, "query × key pairs"));
      box.appendChild(tbl(["query", "key", "attribution"], pairs, function (r) {
        return [qkName(view, r[0]), qkName(view, r[1]), LL.signed(r[2])]; }));
    }
    [["query side", qs], ["key side", ks]].forEach(function (part) {
      if (!part[1].length) return;
      box.appendChild(el("div", {class: "ll-muted"}, part[0] + " (marginal)"));
      box.appendChild(tbl(["node", "attribution"], part[1], function (r) {
        return [qkName(view, r[0]), LL.signed(r[1])]; }));
    });
    return box;
  }

  LL.nodePanel = function (view, i) {
    var G = view.G, box = el("div", {class: "ll-panel", "data-node": i});
    var gname = G.groups[G.group[i]], pinned = view.pinned.has(i);
    box.appendChild(el("h3", {class: "ll-label"}, G.label[i]));
    box.appendChild(el("div", null, [el("span", {class: "ll-badge", style: {background: LL.COLOURS[gname]}},
      LL.GROUP_NAMES[gname] || gname), el("span", {class: "ll-muted"}, G.types[G.type[i]] !== gname ? G.types[G.type[i]] : "")]));
    var tok = G.meta.tokens[G.pos[i]];
    var rows = [["id", G.id[i]], ["row", G.meta.row_names[String(G.row[i])] || G.row[i]],
      ["position", G.pos[i] + (tok !== undefined ? "  " + LL.tok(tok) : "")],
      ["value", LL.fmt(G.value[i], 6)], ["total effect", LL.fmt(G.effect[i], 6)],
      ["influence", isNaN(G.cum[i]) ? "–" : "cumulative share " + LL.fmt(G.cum[i], 3)]];
    if (G.note && G.note[i]) rows.push(["note", G.note[i]]);
    if (!view.shown.node[i]) rows.push(["shown", "no (below the thresholds)"]);
    box.appendChild(el("table", {class: "ll-kv"}, rows.map(function (r) {
      return el("tr", null, [el("th", null, r[0]), el("td", {class: "ll-f-" + r[0].replace(/ /g, "-")}, String(r[1]))]); })));
    box.appendChild(el("div", {style: {margin: "6px 0"}}, [
      el("button", {class: "ll-pin-btn", onclick: function () { view.togglePin(i); }}, pinned ? "Unpin" : "Pin into subgraph"),
      " ", el("button", {onclick: function () { view.center(i); }}, "Center")]));
    var wr = G.writes[String(i)];
    box.appendChild(el("h4", null, "What it writes"));
    if (wr && !wr[0].length) {
      box.appendChild(el("div", {class: "ll-muted ll-writes"}, "nothing: its output is exactly zero here"));
    } else if (wr) {
      var w = el("div", {class: "ll-writes"}, [LL.tokenChips(wr[0], wr[1], false)]);
      if (wr[2] && wr[2].length) w.appendChild(LL.tokenChips(wr[2], wr[3], true));
      w.appendChild(el("div", {class: "ll-muted"}, "logit change per the node's write at its position, through the final norm (frozen) and W_U"));
      box.appendChild(w);
    } else {
      box.appendChild(el("div", {class: "ll-muted"}, gname === "head" || gname === "neuron" || gname === "attn" || gname === "mlp" ?
        "not computed (graph built with writes=0)" : "–"));
    }
    var qk = G.qk[String(i)];
    if (qk) {
      box.appendChild(el("h4", null, "QK attribution"));
      box.appendChild(qkSection(view, qk));
    }
    var ins = sortedEdges(G, G.inStart, G.inList, i), outs = sortedEdges(G, G.outStart, G.outList, i);
    box.appendChild(el("h4", null, "Incoming edges (" + ins.length + ")"));
    box.appendChild(edgeList(view, ins, G.src, "ll-in"));
    box.appendChild(el("h4", null, "Outgoing edges (" + outs.length + ")"));
    box.appendChild(edgeList(view, outs, G.dst, "ll-out"));
    return box;
  };

  LL.pinBox = function (view) {
    var G = view.G, box = el("div", {class: "ll-pinbox"});
    box.appendChild(el("h4", null, "Pinned subgraph (" + view.pinned.size + ")"));
    var chips = el("div", {class: "ll-pins"});
    view.pinned.forEach(function (i) {
      chips.appendChild(el("span", {class: "ll-pin", "data-node": i, onclick: function () { view.select(i, true); }},
        [G.label[i], el("b", {title: "unpin", onclick: function (ev) { ev.stopPropagation(); view.togglePin(i); }}, "×")]));
    });
    box.appendChild(chips);
    if (!view.pinned.size) box.appendChild(el("div", {class: "ll-muted"}, "click a node, then “Pin into subgraph”"));
    return box;
  };
})(LL);
