/* The graph view: decodes the page's data, lays it out, draws it, and wires the reader's
   actions (pan/zoom with d3-zoom, click for the panel, hover for paths, pins, search,
   thresholds, saving the page). window.llExplorer exposes the view to tests and benchmarks. */
var LL = window.LL = window.LL || {};
(function (LL) {
  "use strict";
  var el = LL.el;

  function csr(n, m, key) {
    var start = new Int32Array(n + 1), list = new Int32Array(m), fill, e;
    for (e = 0; e < m; e++) start[key[e] + 1]++;
    for (var i = 0; i < n; i++) start[i + 1] += start[i];
    fill = Int32Array.from(start);
    for (e = 0; e < m; e++) list[fill[key[e]]++] = e;
    return {start: start, list: list};
  }

  LL.buildGraph = function (data) {
    var N = data.nodes, E = data.edges, D = LL.decode;
    var G = {n: N.n, m: E.m, id: N.id, label: N.label, groups: N.groups, types: N.types,
      group: D(N.group, "u1"), type: D(N.type, N.type_dtype === "i4" ? "i4" : "u1"),
      row: D(N.row, "i4"), pos: D(N.pos, "i4"), value: D(N.value, "f8"), effect: D(N.effect, "f8"),
      cum: D(N.cum, "f8"), tw: D(N.tw, "f8"), always: D(N.always, "u1"),
      receiver: D(N.receiver, "u1"), note: N.note, writes: N.writes || {}, qk: N.qk || {},
      src: D(E.src, "i4"), dst: D(E.dst, "i4"), w: D(E.w, "f8"), meta: data.meta};
    G.absw = new Float64Array(G.m);
    for (var e = 0; e < G.m; e++) G.absw[e] = Math.abs(G.w[e]);
    var a = csr(G.n, G.m, G.dst), b = csr(G.n, G.m, G.src);
    G.inStart = a.start; G.inList = a.list; G.outStart = b.start; G.outList = b.list;
    G.idIndex = new Map();
    G.id.forEach(function (x, i) { G.idIndex.set(x, i); });
    G.rank = LL.prune.topoRank(G);
    if (!G.rank) {  /* not a DAG: fall back on the display rows */
      G.rank = new Int32Array(G.n);
      Array.from(G.row.keys()).sort(function (x, y) { return G.row[x] - G.row[y]; })
        .forEach(function (i, r) { G.rank[i] = r; });
    }
    return G;
  };

  function allShown(G) {
    return {node: new Uint8Array(G.n).fill(1), edge: new Uint8Array(G.m).fill(1)};
  }

  LL.graphView = function (root, data, state) {
    var t0 = performance.now(), G = LL.buildGraph(data), L = null;
    LL.timings.build_ms = performance.now() - t0;
    var meta = G.meta, view = {G: G, L: null, data: data, pinned: new Set(), selected: -1,
      hover: -1, matches: [], paths: null, t: d3.zoomIdentity, nodeThreshold: null,
      edgeThreshold: null, subgraphOnly: false, pruneVersion: 0};
    (state.pinned || []).forEach(function (id) { if (G.idIndex.has(id)) view.pinned.add(G.idIndex.get(id)); });

    root.className = "ll";
    var target = (meta.target || []).slice(0, 2).join(", ") +
      ((meta.target || []).length > 2 ? " … (" + meta.target.length + " targets)" : "");
    LL.header(root, document.title, LL.metaLine([
      ["source", meta.source === "lin_lens" ? "lin_lens (exact)" : meta.source],
      ["model", meta.model || meta.scan], ["target", target],
      ["at position", meta.target_pos], ["relative error", meta.relative_error !== undefined ? LL.fmt(meta.relative_error, 2) : null],
      ["nodes", G.n], ["edges", G.m]]));
    var search = el("input", {type: "search", placeholder: "search labels…", id: "ll-search-input"});
    var matchBox = el("div", {class: "ll-matches"});
    function slider(id) { return el("input", {type: "range", min: 0, max: 1, step: 0.01, value: 1, id: id}); }
    var nodeS = slider("ll-node-threshold"), edgeS = slider("ll-edge-threshold");
    var nodeV = el("span", {class: "ll-num"}, "1.00"), edgeV = el("span", {class: "ll-num"}, "1.00");
    var savedTag = el("span", {class: "ll-muted"}, "(as saved)");
    var count = el("span", {class: "ll-count", id: "ll-count"});
    var drawnNote = el("span", {class: "ll-muted", id: "ll-drawn"});
    var subBox = el("input", {type: "checkbox", id: "ll-subgraph-only"});
    var legend = el("span", {class: "ll-legend"});
    Array.from(new Set(Array.from(G.group))).sort().forEach(function (g) {
      var name = G.groups[g];
      legend.appendChild(el("span", null, [el("i", {style: {background: LL.COLOURS[name]}}), LL.GROUP_NAMES[name] || name]));
    });
    root.appendChild(el("div", {class: "ll-bar"}, [
      el("span", {class: "ll-search"}, [search, matchBox]),
      el("label", {title: "node threshold: cumulative influence kept"}, ["nodes", nodeS, nodeV]),
      el("label", {title: "edge threshold: cumulative edge score kept"}, ["edges", edgeS, edgeV]),
      savedTag, el("button", {onclick: function () { setThresholds(null, null); }}, "as saved"),
      el("label", null, [subBox, "pinned only"]),
      el("button", {id: "ll-save", onclick: function () {
        LL.savePage(currentState(), (meta.slug || "lin_lens_graph") + ".html"); }}, "Save page"),
      count, drawnNote, legend]));
    var canvasBox = el("div", {class: "ll-canvas"});
    var base = el("canvas", {class: "ll-base"}), over = el("canvas", {class: "ll-over", id: "ll-canvas"});
    var tip = el("div", {class: "ll-tip"});
    canvasBox.appendChild(base); canvasBox.appendChild(over); canvasBox.appendChild(tip);
    var side = el("div", {class: "ll-side", id: "ll-side"});
    var pinSlot = el("div"), panel = el("div", {id: "ll-panel"},
      el("div", {class: "ll-muted"}, "Click a node for its edges, what it writes and more; hover for its strongest paths to the target; scroll to zoom, drag to pan."));
    side.appendChild(pinSlot); side.appendChild(panel);
    root.appendChild(el("div", {class: "ll-main"}, [canvasBox, side]));

    var W = 0, H = 0, dpr = 1, bctx = base.getContext("2d"), octx = over.getContext("2d");
    view.shown = allShown(G);
    view.bins = LL.edgeBins(G, view.shown);
    view.pathFinder = new LL.prune.Paths(G, view.shown, 3);

    function resize() {
      dpr = window.devicePixelRatio || 1;
      W = canvasBox.clientWidth; H = canvasBox.clientHeight;
      [base, over].forEach(function (c) {
        c.width = Math.max(1, Math.round(W * dpr)); c.height = Math.max(1, Math.round(H * dpr));
        c.style.width = W + "px"; c.style.height = H + "px";
      });
    }
    function drawBase(interactive) {
      bctx.setTransform(dpr, 0, 0, dpr, 0, 0);
      var drawn = LL.drawBase(bctx, G, L, view.shown, view.bins, view.t, W, H, interactive);
      if (!interactive) {
        drawnNote.textContent = drawn >= LL.REST_EDGES ? "(the strongest " +
          LL.REST_EDGES.toLocaleString("en") + " edges in view drawn; zoom in for more)" : "";
      }
    }
    function drawOverlay() {
      octx.setTransform(dpr, 0, 0, dpr, 0, 0);
      LL.drawOverlay(octx, G, L, view.t, W, H, {selected: view.selected, hover: view.hover,
        paths: view.paths, matches: view.matches, pinned: view.pinned, shown: view.shown});
    }
    var frame = 0, idle = 0;
    function schedule(interactive) {
      if (frame) cancelAnimationFrame(frame);
      frame = requestAnimationFrame(function () { frame = 0; drawBase(interactive && G.m > LL.MOVING_EDGES); drawOverlay(); });
      clearTimeout(idle);
      if (interactive && G.m > LL.MOVING_EDGES) idle = setTimeout(function () { drawBase(false); }, 160);
    }
    view.redraw = schedule;

    function updateCount() {
      var nn = 0, ne = 0, i;
      for (i = 0; i < G.n; i++) nn += view.shown.node[i];
      for (i = 0; i < G.m; i++) ne += view.shown.edge[i];
      count.textContent = nn + " / " + G.n + " nodes · " + ne + " / " + G.m + " edges";
      count.setAttribute("data-nodes", nn);
      count.setAttribute("data-edges", ne);
    }
    function applyShown() {
      if (view.subgraphOnly) {
        var s = {node: new Uint8Array(G.n), edge: new Uint8Array(G.m)};
        view.pinned.forEach(function (i) { s.node[i] = 1; });
        for (var e = 0; e < G.m; e++) s.edge[e] = s.node[G.src[e]] && s.node[G.dst[e]] ? 1 : 0;
        view.shown = s;
      } else if (view.nodeThreshold === null) {
        view.shown = allShown(G);
      } else {
        view.shown = LL.prune.prune(G, view.nodeThreshold, view.edgeThreshold);
      }
      view.bins = LL.edgeBins(G, view.shown);
      view.pathFinder = new LL.prune.Paths(G, view.shown, 3);
      view.paths = null;
      view.pruneVersion++;
      updateCount();
      if (view.selected >= 0) showPanel(view.selected);
      schedule(false);
    }
    function setThresholds(nt, et) {
      view.nodeThreshold = nt; view.edgeThreshold = nt === null ? null : et;
      nodeS.value = nt === null ? 1 : nt; edgeS.value = nt === null ? 1 : et;
      nodeV.textContent = Number(nodeS.value).toFixed(2); edgeV.textContent = Number(edgeS.value).toFixed(2);
      savedTag.style.visibility = nt === null ? "visible" : "hidden";
      applyShown();
    }
    var pruneTimer = 0;
    function onSlider() {
      nodeV.textContent = Number(nodeS.value).toFixed(2); edgeV.textContent = Number(edgeS.value).toFixed(2);
      clearTimeout(pruneTimer);
      pruneTimer = setTimeout(function () { setThresholds(Number(nodeS.value), Number(edgeS.value)); }, G.m > 50000 ? 60 : 0);
    }
    nodeS.addEventListener("input", onSlider);
    edgeS.addEventListener("input", onSlider);
    subBox.addEventListener("change", function () { view.subgraphOnly = subBox.checked; applyShown(); });

    function showPanel(i) {
      panel.textContent = "";
      panel.appendChild(LL.nodePanel(view, i));
    }
    function showPins() {
      pinSlot.textContent = "";
      pinSlot.appendChild(LL.pinBox(view));
    }
    view.select = function (i, fromPanel) {
      view.selected = i;
      base.classList.toggle("ll-dim", i >= 0);
      if (i < 0) {
        panel.textContent = "";
        panel.appendChild(el("div", {class: "ll-muted"}, "Click a node."));
      } else {
        showPanel(i);
        if (fromPanel) {
          var s = LL.screen(L, view.t, i);
          if (s.x < L.left || s.x > W || s.y < 0 || s.y > H - L.bottom) view.center(i);
        }
      }
      drawOverlay();
    };
    view.togglePin = function (i) {
      if (view.pinned.has(i)) view.pinned.delete(i); else view.pinned.add(i);
      LL.setState(currentState());
      showPins();
      if (view.selected >= 0) showPanel(view.selected);
      if (view.subgraphOnly) applyShown(); else drawOverlay();
    };
    function currentState() {
      return {pinned: Array.from(view.pinned).map(function (i) { return G.id[i]; }),
        node_threshold: view.nodeThreshold, edge_threshold: view.edgeThreshold,
        subgraph_only: view.subgraphOnly};
    }

    var zoom = d3.zoom().scaleExtent([0.01, 60]).on("zoom", function (ev) {
      view.t = ev.transform;
      if (ev.sourceEvent) view.moved = true;  /* the reader moved it: keep it on resizes */
      schedule(true);
    });
    var sel = d3.select(over).call(zoom).on("dblclick.zoom", null);
    view.center = function (i) {
      var k = Math.max(view.t.k, 1);
      view.moved = true;
      sel.call(zoom.transform, d3.zoomIdentity.translate(W / 2 - L.X[i] * k, H / 2 - L.Y[i] * k).scale(k));
    };
    function fit() {
      var k = Math.min((W - L.left - 20) / L.width, (H - L.bottom - 20) / L.height, 3);
      k = Math.max(k, 0.01);
      var y = Math.max(10, (H - L.bottom - L.height * k) / 2);
      sel.call(zoom.transform, d3.zoomIdentity.translate(L.left + 10, y).scale(k));
    }

    over.addEventListener("click", function (ev) {
      var t1 = ev.timeStamp, r = over.getBoundingClientRect();
      var i = LL.hit(G, L, view.t, view.shown, ev.clientX - r.left, ev.clientY - r.top, view.selected);
      view.select(i, false);
      requestAnimationFrame(function () {
        setTimeout(function () {
          LL.timings.click_ms = performance.now() - t1;
          (LL.timings.clicks = LL.timings.clicks || []).push(LL.timings.click_ms);
        }, 0);
      });
    });
    var hoverFrame = 0, lastMove = null;
    over.addEventListener("mousemove", function (ev) {
      lastMove = ev;
      if (hoverFrame) return;
      hoverFrame = requestAnimationFrame(function () {
        hoverFrame = 0;
        var r = over.getBoundingClientRect(), x = lastMove.clientX - r.left, y = lastMove.clientY - r.top;
        var i = LL.hit(G, L, view.t, view.shown, x, y, -1);
        if (i !== view.hover) {
          view.hover = i;
          view.paths = i >= 0 ? view.pathFinder.from(i) : null;
          drawOverlay();
        }
        if (i >= 0) {
          tip.style.display = "block";
          tip.style.left = Math.min(x + 12, W - 220) + "px"; tip.style.top = (y + 12) + "px";
          var best = view.paths && view.paths.length ? "  ·  strongest path " + LL.fmt(view.paths[0].score, 3) : "";
          tip.textContent = G.label[i] + "  ·  value " + LL.fmt(G.value[i]) + best;
        } else tip.style.display = "none";
      });
    });
    over.addEventListener("mouseleave", function () { view.hover = -1; view.paths = null; tip.style.display = "none"; drawOverlay(); });
    document.addEventListener("keydown", function (ev) { if (ev.key === "Escape") view.select(-1); });

    var lower = G.label.map(function (s) { return String(s).toLowerCase(); });
    search.addEventListener("input", function () {
      var q = search.value.trim().toLowerCase();
      view.matches = [];
      matchBox.textContent = "";
      if (q) {
        for (var i = 0; i < G.n && view.matches.length < 500; i++) {
          if (lower[i].indexOf(q) >= 0 || G.id[i].toLowerCase() === q) view.matches.push(i);
        }
        view.matches.slice(0, 30).forEach(function (i) {
          matchBox.appendChild(el("div", {"data-node": i, onclick: function () {
            view.select(i, true); matchBox.style.display = "none"; }}, G.label[i]));
        });
      }
      matchBox.style.display = view.matches.length ? "block" : "none";
      drawOverlay();
    });
    search.addEventListener("keydown", function (ev) {
      if (ev.key === "Enter" && view.matches.length) { view.select(view.matches[0], true); matchBox.style.display = "none"; }
      if (ev.key === "Escape") { search.value = ""; search.dispatchEvent(new Event("input")); }
    });
    var lastSize = "";
    function onResize() {
      var size = canvasBox.clientWidth + "x" + canvasBox.clientHeight;
      if (size === lastSize) return;
      lastSize = size;
      resize();
      if (!view.moved && L) fit();
      schedule(false);
    }
    if (window.ResizeObserver) new ResizeObserver(onResize).observe(canvasBox);
    else window.addEventListener("resize", onResize);

    resize();
    lastSize = canvasBox.clientWidth + "x" + canvasBox.clientHeight;
    L = view.L = LL.layout(G, Math.max(W - 78, 100) / Math.max(H - 34, 100));
    subBox.checked = !!state.subgraph_only;
    view.subgraphOnly = !!state.subgraph_only;
    showPins();
    if (typeof state.node_threshold === "number") setThresholds(state.node_threshold, state.edge_threshold);
    else applyShown();
    fit();
    if (frame) { cancelAnimationFrame(frame); frame = 0; }
    drawBase(false); drawOverlay();
    LL.timings.first_draw_ms = performance.now() - t0;
    LL.timings.first_render_ms = performance.now();
    requestAnimationFrame(function () {  /* the frame that shows the first drawing */
      setTimeout(function () { LL.timings.first_frame_ms = performance.now(); }, 0);
    });

    window.llExplorer = {view: view, timings: LL.timings,
      indexOf: function (key) { var i = G.label.indexOf(key); return i >= 0 ? i : (G.idIndex.has(key) ? G.idIndex.get(key) : -1); },
      nodeScreen: function (i) { return LL.screen(L, view.t, i); },
      shown: function () { return {nodes: Number(count.getAttribute("data-nodes")), edges: Number(count.getAttribute("data-edges"))}; },
      prune: function (nt, et) { var s = LL.prune.prune(G, nt, et), c = 0; for (var i = 0; i < G.n; i++) c += s.node[i]; return c; },
      center: function (i) { view.center(i); drawBase(false); drawOverlay(); },
      fit: function () { fit(); drawBase(false); drawOverlay(); },
      draw: function (interactive) {
        var t = performance.now(); drawBase(!!interactive); drawOverlay(); return performance.now() - t; },
      state: currentState, ready: true};
    return view;
  };
})(LL);
