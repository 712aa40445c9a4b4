/* A linear map's per-token view: each source token's contribution, stable rank, singular
   values and decoded singular vectors (output side through the final norm and W_U, input side
   by cosine with W_E), and the stacked operator's; from a LinearMap or a corpus run's row. */
var LL = window.LL = window.LL || {};
(function (LL) {
  "use strict";
  var el = LL.el;

  function vecCell(vecs, j) {
    var v = vecs && vecs[j];
    return v ? LL.tokenChips(v) : "–";
  }

  function bar(x, max, neg) {
    var wpx = max > 0 ? Math.max(1, 70 * Math.abs(x) / max) : 0;
    return el("span", null, [el("span", {class: "ll-cellbar", style: {width: wpx + "px",
      background: neg ? "#d06060" : "#4a7fd0"}}), LL.fmt(x)]);
  }

  LL.mapView = function (root, data) {
    var m = data.meta || {}, toks = data.tokens || [], n = toks.length;
    root.className = "ll ll-doc";
    var back = data.back ? el("a", {href: data.back.href}, "← " + data.back.label) : null;
    var head = LL.header(root, m.title || document.title, LL.metaLine([
      ["hook", m.hook], ["source", m.source], ["position", m.position], ["model", m.model],
      ["prediction", m.prediction !== undefined ? LL.tok(m.prediction) + (m.probability !== undefined ? " (p=" + LL.fmt(m.probability, 3) + ")" : "") : null],
      ["relative error", m.relative_error !== undefined ? LL.fmt(m.relative_error, 2) : null],
      ["status", m.status]]));
    if (back) head.insertBefore(el("div", null, back), head.firstChild);
    if (m.note) root.appendChild(el("p", {class: "ll-muted"}, m.note));
    var contrib = data.contribution || [], sr = data.stable_rank || [], S = data.S || [];
    var cmax = 0, smax = 0;
    contrib.forEach(function (x) { if (x !== null) cmax = Math.max(cmax, Math.abs(x)); });
    sr.forEach(function (x) { if (x !== null) smax = Math.max(smax, x); });
    var selected = -1, chips = el("div", {class: "ll-chips", id: "ll-token-chips"});
    toks.forEach(function (t, i) {
      var x = contrib[i], a = cmax > 0 && x !== null ? Math.abs(x) / cmax : 0;
      var bg = x < 0 ? "rgba(208,80,80," + (0.08 + 0.7 * a) + ")" : "rgba(60,110,200," + (0.08 + 0.7 * a) + ")";
      chips.appendChild(el("span", {class: "ll-chip", "data-i": i, style: {background: bg},
        title: (data.contribution_label || "contribution") + " " + LL.fmt(x),
        onclick: function () { select(i); }}, LL.tok(t)));
    });
    root.appendChild(el("div", {class: "ll-muted"}, "Source tokens, coloured by " +
      (data.contribution_label || "contribution") + "; click one for its singular vectors."));
    root.appendChild(chips);
    var rows = toks.map(function (t, i) {
      return {i: i, token: t, contribution: contrib[i], share: (data.share || [])[i],
        stable_rank: sr[i], s1: S[i] ? S[i][0] : null};
    });
    var cols = [{key: "i", label: "#", num: true, render: function (r) { return String(r.i); }},
      {key: "token", label: "token", render: function (r) { return LL.tok(r.token); }},
      {key: "contribution", label: data.contribution_label || "contribution", num: true,
        render: function (r) { return r.contribution === null || r.contribution === undefined ? "–" : bar(r.contribution, cmax, r.contribution < 0); }}];
    if (data.share) cols.push({key: "share", label: "share", num: true});
    cols.push({key: "stable_rank", label: "stable rank", num: true, render: function (r) {
      return r.stable_rank === null || r.stable_rank === undefined ? "–" : bar(r.stable_rank, smax, false); }});
    cols.push({key: "s1", label: "s₁", num: true});
    cols.push({key: "u1", label: "U₁ → tokens", render: function (r) { return vecCell((data.U || [])[r.i], 0); }});
    cols.push({key: "v1", label: "V₁ → tokens", render: function (r) { return vecCell((data.V || [])[r.i], 0); }});
    var table = LL.table(cols, rows, {id: "ll-map-table", rowAttrs: function (r) {
      return {"data-i": r.i, onclick: function () { select(r.i); }}; }});
    root.appendChild(table);
    var detail = el("div", {class: "ll-card", id: "ll-map-detail"});
    root.appendChild(detail);
    if (data.stacked) {
      var st = data.stacked, card = el("div", {class: "ll-card"}, [el("b", null, "Stacked operator [J₀ | J₁ | …]"),
        el("div", null, "stable rank " + LL.fmt(st.stable_rank) + " · singular values " +
          (st.S || []).slice(0, 8).map(function (x) { return LL.fmt(x, 3); }).join(", "))]);
      (st.U || []).forEach(function (u, j) {
        card.appendChild(el("div", null, ["U" + j + ": ", u ? LL.tokenChips(u) : "–"]));
      });
      (st.V || []).forEach(function (v, j) {
        var srcTok = st.V_source && st.V_source[j] !== undefined ? " (on token " + st.V_source[j] + ")" : "";
        card.appendChild(el("div", null, ["V" + j + srcTok + ": ", v ? LL.tokenChips(v) : "–"]));
      });
      root.appendChild(card);
    }
    function select(i) {
      selected = i;
      Array.prototype.forEach.call(chips.children, function (c, k) { c.classList.toggle("sel", k === i); });
      Array.prototype.forEach.call(table.querySelectorAll("tbody tr"), function (tr) {
        tr.classList.toggle("sel", Number(tr.getAttribute("data-i")) === i); });
      detail.textContent = "";
      detail.appendChild(el("b", null, "token " + i + " " + LL.tok(toks[i])));
      detail.appendChild(el("div", null, "stable rank " + LL.fmt(sr[i]) + " · singular values " +
        (S[i] || []).map(function (x) { return LL.fmt(x, 3); }).join(", ")));
      var U = (data.U || [])[i] || [], V = (data.V || [])[i] || [];
      for (var j = 0; j < Math.max(U.length, V.length); j++) {
        detail.appendChild(el("div", null, ["U" + j + " (output side): ", vecCell(U, j)]));
        detail.appendChild(el("div", null, ["V" + j + " (input side): ", vecCell(V, j)]));
      }
      if (!U.length && !V.length) detail.appendChild(el("div", {class: "ll-muted"}, "decoded vectors need the model (lin_lens.explorer.map_page(lm, model))"));
    }
    if (n) select(n - 1);
    window.llExplorer = {ready: true, select: select, timings: LL.timings};
  };
})(LL);
