/* Graph layout and canvas drawing. Rows are display levels (input at the bottom, targets on
   top), columns token positions; the nodes of one (row, position) cell sit side by side, the
   most influential first, wrapping onto more lines when a cell is crowded. Edges are drawn on
   a canvas in a few batched paths (sign x strength), never one DOM element each; while the
   view moves only the strongest edges are drawn, all of them once it rests. */
var LL = window.LL = window.LL || {};
(function (LL) {
  "use strict";
  var S = 11, PADX = 8, PADY = 4, MIN_COL = 84, MIN_ROW = 20;
  var LEFT = 78, BOTTOM = 34, NBINS = 24;
  /* edges drawn at most, strongest first among those in view: canvas lines are rasterised
     after the script, ~2.5 ms per 1,000 on one CPU core; zooming in brings the rest into view */
  LL.REST_EDGES = 60000;
  LL.MOVING_EDGES = 20000;

  /* aspect: the wanted width / height of the whole layout (the canvas's): a crowded cell
     wraps onto more lines, at the width per column that brings the layout closest to it. */
  LL.layout = function (G, aspect) {
    var P = Math.max(G.meta.tokens.length, 1), i, rows = [];
    for (i = 0; i < G.n; i++) { if (G.pos[i] >= P) P = G.pos[i] + 1; rows.push(G.row[i]); }
    var levels = Array.from(new Set(rows)).sort(function (a, b) { return a - b; });
    var rIndex = new Map(levels.map(function (lv, k) { return [lv, k]; }));
    var R = levels.length, cells = new Map();
    for (i = 0; i < G.n; i++) {
      var key = rIndex.get(G.row[i]) * P + G.pos[i];
      if (!cells.has(key)) cells.set(key, []);
      cells.get(key).push(i);
    }
    var maxAt = new Int32Array(P);
    cells.forEach(function (list, key) {
      list.sort(function (a, b) {
        var x = G.cum[a], y = G.cum[b];
        if (isNaN(x) !== isNaN(y)) return isNaN(x) ? 1 : -1;
        return (x - y) || (Math.abs(G.value[b]) - Math.abs(G.value[a])) || (a - b);
      });
      maxAt[key % P] = Math.max(maxAt[key % P], list.length);
    });
    function grid(cap) {
      var perLine = new Int32Array(P), colX = new Float64Array(P + 1), lines = new Int32Array(R);
      for (var p = 0; p < P; p++) {
        perLine[p] = Math.max(1, Math.min(cap, maxAt[p]));
        colX[p + 1] = colX[p] + Math.max(MIN_COL, perLine[p] * S + 2 * PADX);
      }
      cells.forEach(function (list, key) {
        var r = Math.floor(key / P);
        lines[r] = Math.max(lines[r], Math.ceil(list.length / perLine[key % P]));
      });
      var rowTop = new Float64Array(R), rowH = new Float64Array(R), y = 0;
      for (var r = R - 1; r >= 0; r--) {  /* targets on top */
        rowH[r] = Math.max(MIN_ROW, lines[r] * S + 2 * PADY);
        rowTop[r] = y;
        y += rowH[r];
      }
      return {perLine: perLine, colX: colX, rowTop: rowTop, rowH: rowH, width: colX[P], height: y};
    }
    var best = null, bestScore = Infinity;
    [2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128].forEach(function (cap) {
      var gr = grid(cap), score = Math.abs(Math.log(gr.width / gr.height / (aspect || 1.6)));
      if (score < bestScore - 1e-9) { best = gr; bestScore = score; }
    });
    var X = new Float64Array(G.n), Y = new Float64Array(G.n);
    cells.forEach(function (list, key) {
      var r = Math.floor(key / P), p = key % P, per = best.perLine[p];
      list.forEach(function (node, k) {
        X[node] = best.colX[p] + PADX + (k % per) * S + S / 2;
        Y[node] = best.rowTop[r] + PADY + Math.floor(k / per) * S + S / 2;
      });
    });
    return {X: X, Y: Y, P: P, R: R, levels: levels, colX: best.colX, rowTop: best.rowTop,
      rowH: best.rowH, width: best.width, height: best.height, left: LEFT, bottom: BOTTOM};
  };

  /* Edge bins for the current pruning state: sign x strength (share of the receiver's
     incoming |edges|, square-root scaled, 24 levels), weakest first. */
  LL.edgeBins = function (G, shown) {
    var rows = new Float64Array(G.n), e, bins = [];
    for (e = 0; e < G.m; e++) if (shown.edge[e]) rows[G.dst[e]] += G.absw[e];
    for (var b = 0; b < 2 * NBINS; b++) bins.push([]);
    for (e = 0; e < G.m; e++) {
      if (!shown.edge[e]) continue;
      var s = Math.sqrt(G.absw[e] / Math.max(rows[G.dst[e]], 1e-300));
      var lv = Math.min(NBINS - 1, Math.floor(s * NBINS));
      bins[(G.w[e] < 0 ? NBINS : 0) + lv].push(e);
    }
    var order = [];
    for (var lv2 = 0; lv2 < NBINS; lv2++) {
      order.push({list: Int32Array.from(bins[lv2]), level: lv2, neg: false});
      order.push({list: Int32Array.from(bins[NBINS + lv2]), level: lv2, neg: true});
    }
    return order;  /* weakest first: drawn first, stronger on top */
  };

  function edgeStyle(bin) {  /* weak edges faint, strong ones dark */
    var f = (Math.floor(bin.level / 4) + 0.5) / (NBINS / 4), a = 0.035 + 0.8 * f * f;
    return {colour: bin.neg ? "rgba(200,40,40," + a + ")" : "rgba(40,90,190," + a + ")",
      width: bin.level >= NBINS - 8 ? 1.6 : 1};
  }

  LL.screen = function (L, t, i) {
    return {x: t.x + L.X[i] * t.k, y: t.y + L.Y[i] * t.k};
  };
  LL.nodeRadius = function (t) { return Math.max(1.6, Math.min(6, 2.6 * Math.sqrt(t.k))); };

  /* base canvas: rows, edges, nodes, labels */
  LL.drawBase = function (ctx, G, L, shown, bins, t, w, h, interactive) {
    ctx.clearRect(0, 0, w, h);
    var r, i, k;
    ctx.fillStyle = "#f7f8fa";
    for (r = 0; r < L.R; r += 2) ctx.fillRect(0, t.y + L.rowTop[r] * t.k, w, L.rowH[r] * t.k);
    ctx.strokeStyle = "#eceef2";
    ctx.lineWidth = 1;
    ctx.beginPath();
    for (var p = 0; p <= L.P; p++) {
      var cx = Math.round(t.x + L.colX[p] * t.k) + 0.5;
      ctx.moveTo(cx, 0); ctx.lineTo(cx, h - L.bottom);
    }
    ctx.stroke();
    var sx = new Float64Array(G.n), sy = new Float64Array(G.n);
    for (i = 0; i < G.n; i++) { sx[i] = t.x + L.X[i] * t.k; sy[i] = t.y + L.Y[i] * t.k; }
    var budget = interactive ? LL.MOVING_EDGES : LL.REST_EDGES, taken = 0, lists = [];
    for (k = bins.length - 1; k >= 0; k--) {  /* the strongest edges in view, up to budget */
      var sel = [], list = bins[k].list;
      for (var q = 0; q < list.length && taken < budget; q++) {
        var e = list[q], x1 = sx[G.src[e]], y1 = sy[G.src[e]], x2 = sx[G.dst[e]], y2 = sy[G.dst[e]];
        if ((x1 < 0 && x2 < 0) || (x1 > w && x2 > w) || (y1 < 0 && y2 < 0) || (y1 > h && y2 > h)) continue;
        sel.push(e);
        taken++;
      }
      lists[k] = sel;
    }
    for (k = 0; k < bins.length; k++) {  /* weakest first, the strong ones on top */
      if (!lists[k].length) continue;
      var st = edgeStyle(bins[k]), drawn = lists[k];
      ctx.strokeStyle = st.colour;
      ctx.lineWidth = st.width;
      ctx.beginPath();
      for (var r2 = 0; r2 < drawn.length; r2++) {
        var a = G.src[drawn[r2]], b = G.dst[drawn[r2]];
        ctx.moveTo(sx[a], sy[a]); ctx.lineTo(sx[b], sy[b]);
      }
      ctx.stroke();
    }
    var rad = LL.nodeRadius(t), byGroup = {};
    for (i = 0; i < G.n; i++) {
      if (!shown.node[i] || sx[i] < -rad || sx[i] > w + rad || sy[i] < -rad || sy[i] > h + rad) continue;
      var gname = G.groups[G.group[i]];
      (byGroup[gname] = byGroup[gname] || []).push(i);
    }
    Object.keys(byGroup).forEach(function (gname) {
      ctx.fillStyle = LL.COLOURS[gname] || LL.COLOURS.other;
      ctx.beginPath();
      byGroup[gname].forEach(function (j) {
        if (gname === "error") ctx.rect(sx[j] - rad, sy[j] - rad, 2 * rad, 2 * rad);
        else { ctx.moveTo(sx[j] + rad, sy[j]); ctx.arc(sx[j], sy[j], rad, 0, 6.2832); }
      });
      ctx.fill();
    });
    drawLabels(ctx, G, L, t, w, h);
    return taken;
  };

  function drawLabels(ctx, G, L, t, w, h) {
    ctx.fillStyle = "rgba(255,255,255,0.92)";
    ctx.fillRect(0, 0, L.left - 4, h);
    ctx.fillRect(0, h - L.bottom, w, L.bottom);
    ctx.font = "11px system-ui, sans-serif";
    ctx.fillStyle = "#555";
    ctx.textBaseline = "middle";
    var last = -1e9;
    for (var r = 0; r < L.R; r++) {  /* bottom up, skipping labels that would overlap */
      var y = t.y + (L.rowTop[r] + L.rowH[r] / 2) * t.k;
      if (y < 0 || y > h - L.bottom || Math.abs(y - last) < 12) continue;
      last = y;
      var name = G.meta.row_names[String(L.levels[r])] || String(L.levels[r]);
      ctx.fillText(name, 4, y);
    }
    ctx.fillStyle = "#222";
    ctx.font = "12px ui-monospace, Menlo, monospace";
    var toks = G.meta.tokens;
    for (var p = 0; p < L.P; p++) {
      var x0 = t.x + L.colX[p] * t.k, x1 = t.x + L.colX[p + 1] * t.k;
      if (x1 < L.left || x0 > w) continue;
      var label = LL.tok(toks[p] !== undefined ? toks[p] : "#" + p);
      var maxw = Math.max(x1 - x0 - 6, 10);
      while (label.length > 1 && ctx.measureText(label).width > maxw) label = label.slice(0, -1);
      ctx.fillText(label, Math.max(x0 + 3, L.left), h - L.bottom / 2 - 5);
      ctx.fillStyle = "#999";
      ctx.font = "10px system-ui, sans-serif";
      ctx.fillText(String(p), Math.max(x0 + 3, L.left), h - 7);
      ctx.fillStyle = "#222";
      ctx.font = "12px ui-monospace, Menlo, monospace";
    }
  }

  /* overlay: selection, hovered paths, pins, search matches */
  LL.drawOverlay = function (ctx, G, L, t, w, h, o) {
    ctx.clearRect(0, 0, w, h);
    var rad = LL.nodeRadius(t);
    function edgeLine(e, colour, width) {
      var a = LL.screen(L, t, G.src[e]), b = LL.screen(L, t, G.dst[e]);
      ctx.strokeStyle = colour; ctx.lineWidth = width;
      ctx.beginPath(); ctx.moveTo(a.x, a.y); ctx.lineTo(b.x, b.y); ctx.stroke();
    }
    function ring(i, colour, width, extra) {
      var s = LL.screen(L, t, i);
      ctx.strokeStyle = colour; ctx.lineWidth = width;
      ctx.beginPath(); ctx.arc(s.x, s.y, rad + (extra || 2), 0, 6.2832); ctx.stroke();
    }
    function dot(i) {
      var s = LL.screen(L, t, i);
      ctx.fillStyle = LL.COLOURS[G.groups[G.group[i]]] || LL.COLOURS.other;
      ctx.beginPath(); ctx.arc(s.x, s.y, rad + 1, 0, 6.2832); ctx.fill();
    }
    if (o.selected >= 0) {
      var sel = o.selected, k, e;
      for (k = G.inStart[sel]; k < G.inStart[sel + 1]; k++) {
        e = G.inList[k];
        if (o.shown.edge[e]) edgeLine(e, G.w[e] < 0 ? "rgba(200,40,40,.85)" : "rgba(40,90,190,.85)", 1.8);
      }
      for (k = G.outStart[sel]; k < G.outStart[sel + 1]; k++) {
        e = G.outList[k];
        if (o.shown.edge[e]) edgeLine(e, G.w[e] < 0 ? "rgba(200,40,40,.85)" : "rgba(40,90,190,.85)", 1.8);
      }
      for (k = G.inStart[sel]; k < G.inStart[sel + 1]; k++) if (o.shown.edge[G.inList[k]]) dot(G.src[G.inList[k]]);
      for (k = G.outStart[sel]; k < G.outStart[sel + 1]; k++) if (o.shown.edge[G.outList[k]]) dot(G.dst[G.outList[k]]);
    }
    (o.paths || []).forEach(function (path, j) {
      path.edges.forEach(function (e) { edgeLine(e, j === 0 ? "rgba(240,160,0,.95)" : "rgba(240,180,40,.7)", j === 0 ? 3 : 2); });
      path.nodes.forEach(function (i) { dot(i); ring(i, "#e09000", 1.5, 1); });
    });
    o.matches.forEach(function (i) { ring(i, "#e0b000", 2.5, 3); });
    o.pinned.forEach(function (i) { ring(i, "#a07000", 1.5, 1.5); });
    if (o.hover >= 0) ring(o.hover, "#444", 1.5);
    if (o.selected >= 0) { dot(o.selected); ring(o.selected, "#000", 2.5); }
  };

  /* the shown node under a screen point, or -1 */
  LL.hit = function (G, L, t, shown, x, y, extraNode) {
    var best = -1, bestD = Math.pow(Math.max(7, LL.nodeRadius(t) + 3), 2);
    for (var i = 0; i < G.n; i++) {
      if (!shown.node[i] && i !== extraNode) continue;
      var dx = t.x + L.X[i] * t.k - x, dy = t.y + L.Y[i] * t.k - y, d = dx * dx + dy * dy;
      if (d < bestD) { bestD = d; best = i; }
    }
    return best;
  };
})(LL);
