/* A corpus run's summary: the numbers, the stable rank of J_i by token position (every prompt a
   dot, the median a line, the inter-quartile range a band: the paper's Fig. 3) and a sortable,
   filterable table of the prompts, each linked to its own map view. */
var LL = window.LL = window.LL || {};
(function (LL) {
  "use strict";
  var el = LL.el;

  function quantile(sorted, q) {
    if (!sorted.length) return NaN;
    var pos = (sorted.length - 1) * q, lo = Math.floor(pos), hi = Math.ceil(pos);
    return sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo);
  }

  LL.stableRankFigure = function (byPos, width, height) {
    var c = el("canvas", {id: "ll-sr-figure", width: width, height: height});
    var ctx = c.getContext("2d"), keys = Object.keys(byPos).map(Number).sort(function (a, b) { return a - b; });
    var ml = 48, mr = 12, mt = 12, mb = 34, ymax = 0;
    keys.forEach(function (k) { byPos[k].forEach(function (v) { if (v > ymax) ymax = v; }); });
    ymax = ymax > 0 ? ymax * 1.05 : 1;
    var xmax = keys.length ? keys[keys.length - 1] : 1;
    function X(p) { return ml + (width - ml - mr) * (xmax > 0 ? p / xmax : 0.5); }
    function Y(v) { return mt + (height - mt - mb) * (1 - v / ymax); }
    ctx.fillStyle = "#fff"; ctx.fillRect(0, 0, width, height);
    ctx.strokeStyle = "#999"; ctx.lineWidth = 1;
    ctx.beginPath(); ctx.moveTo(ml, mt); ctx.lineTo(ml, height - mb); ctx.lineTo(width - mr, height - mb); ctx.stroke();
    ctx.fillStyle = "#444"; ctx.font = "11px system-ui, sans-serif"; ctx.textAlign = "right"; ctx.textBaseline = "middle";
    for (var t = 0; t <= 4; t++) {
      var v = ymax * t / 4;
      ctx.fillText(LL.fmt(v, 3), ml - 4, Y(v));
      ctx.strokeStyle = "#eee"; ctx.beginPath(); ctx.moveTo(ml + 1, Y(v)); ctx.lineTo(width - mr, Y(v)); ctx.stroke();
    }
    ctx.textAlign = "center"; ctx.textBaseline = "top";
    var step = Math.max(1, Math.ceil(keys.length / 20));
    keys.forEach(function (k, j) { if (j % step === 0) ctx.fillText(String(k), X(k), height - mb + 4); });
    ctx.fillText("token position i", (ml + width - mr) / 2, height - 14);
    var med = [], q1 = [], q3 = [], seed = 1;
    function rnd() { seed = (seed * 16807) % 2147483647; return seed / 2147483647; }
    keys.forEach(function (k) {
      var vals = byPos[k].slice().sort(function (a, b) { return a - b; });
      med.push(quantile(vals, 0.5)); q1.push(quantile(vals, 0.25)); q3.push(quantile(vals, 0.75));
      ctx.fillStyle = "rgba(31,119,180,0.25)";
      vals.forEach(function (v) { ctx.fillRect(X(k) + (rnd() - 0.5) * 10 - 1.5, Y(v) - 1.5, 3, 3); });
    });
    ctx.fillStyle = "rgba(31,119,180,0.15)";
    ctx.beginPath();
    keys.forEach(function (k, j) { if (j) ctx.lineTo(X(k), Y(q3[j])); else ctx.moveTo(X(k), Y(q3[j])); });
    for (var j = keys.length - 1; j >= 0; j--) ctx.lineTo(X(keys[j]), Y(q1[j]));
    ctx.fill();
    ctx.strokeStyle = "#1f77b4"; ctx.lineWidth = 2; ctx.beginPath();
    keys.forEach(function (k, j2) { if (j2) ctx.lineTo(X(k), Y(med[j2])); else ctx.moveTo(X(k), Y(med[j2])); });
    ctx.stroke();
    ctx.fillStyle = "#1f77b4";
    keys.forEach(function (k, j3) { ctx.beginPath(); ctx.arc(X(k), Y(med[j3]), 3, 0, 6.2832); ctx.fill(); });
    ctx.save(); ctx.translate(12, (mt + height - mb) / 2); ctx.rotate(-Math.PI / 2);
    ctx.fillStyle = "#444"; ctx.textAlign = "center"; ctx.fillText("stable rank of J_i", 0, 0); ctx.restore();
    return c;
  };

  LL.corpusView = function (root, data) {
    var m = data.meta || {}, s = m.summary || {};
    root.className = "ll ll-doc";
    var head = LL.header(root, m.title || document.title, LL.metaLine([
      ["model", m.model], ["dtype", m.dtype], ["backend", m.backend], ["hook", m.hook],
      ["rows", s.rows], ["ok", s.ok], ["failed", s.failed]]));
    if (data.back) head.insertBefore(el("div", null, el("a", {href: data.back.href}, "← " + data.back.label)), head.firstChild);
    root.appendChild(el("table", {class: "ll-kv", style: {width: "auto", margin: "8px 0"}}, [
      ["U₀ of the stacked operator has the prediction in its top 5", s.u0_top5_share],
      ["relative error, median", s.error_median], ["relative error, max", s.error_max],
      ["stacked stable rank, median", s.stacked_stable_rank_median]].map(function (r) {
        return el("tr", null, [el("th", null, r[0]), el("td", null, LL.fmt(r[1], 3))]); })));
    root.appendChild(el("h3", null, "Stable rank by token position"));
    root.appendChild(LL.stableRankFigure(data.by_position || {}, 720, 330));
    root.appendChild(el("h3", null, "Prompts (" + (data.rows || []).length + ")"));
    var filter = el("input", {type: "search", placeholder: "filter prompts…", id: "ll-filter"});
    root.appendChild(filter);
    var table = LL.table([
      {key: "prompt_index", label: "#", num: true, render: function (r) { return String(r.prompt_index); }},
      {key: "text", label: "prompt", render: function (r) {
        return r.href ? el("a", {href: r.href, class: "ll-prompt-link"}, r.text) : r.text; }},
      {key: "target_pos", label: "pos", num: true, render: function (r) { return String(r.target_pos); }},
      {key: "n_tokens", label: "tokens", num: true, render: function (r) { return String(r.n_tokens); }},
      {key: "prediction", label: "prediction", render: function (r) { return r.prediction == null ? "–" : LL.tok(r.prediction); }},
      {key: "probability", label: "p", num: true},
      {key: "stable_rank_stacked", label: "stacked stable rank", num: true},
      {key: "relative_error", label: "relative error", num: true},
      {key: "status", label: "status"},
      {key: "u0", label: "U₀ → tokens", render: function (r) { return r.u0 ? LL.tokenChips(r.u0) : "–"; }}],
      data.rows || [], {id: "ll-corpus-table"});
    filter.addEventListener("input", function () {
      var q = filter.value.toLowerCase();
      table.filter(function (r) { return String(r.text).toLowerCase().indexOf(q) >= 0; });
    });
    root.appendChild(table);
    window.llExplorer = {ready: true, timings: LL.timings};
  };
})(LL);
