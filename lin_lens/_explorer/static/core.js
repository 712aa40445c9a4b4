/* lin_lens explorer, shared helpers: typed-array decoding, DOM building, number and token
   formatting, sortable tables, saving the page with its state. Plain ES5-style JavaScript, no
   framework, no build step; d3 (bundled) is used only for pan and zoom. */
var LL = window.LL = window.LL || {};
(function (LL) {
  "use strict";
  LL.timings = LL.timings || {};

  /* base64 of little-endian bytes -> typed array ("f8", "i4" or "u1") */
  LL.decode = function (b64, type) {
    var bin = atob(b64 || ""), n = bin.length, bytes = new Uint8Array(n);
    for (var i = 0; i < n; i++) bytes[i] = bin.charCodeAt(i);
    if (type === "f8") return new Float64Array(bytes.buffer);
    if (type === "i4") return new Int32Array(bytes.buffer);
    return bytes;
  };

  /* el("div", {class: "x", onclick: f}, [children or text]) */
  LL.el = function (tag, attrs, kids) {
    var e = document.createElement(tag);
    if (attrs) {
      for (var k in attrs) {
        if (!Object.prototype.hasOwnProperty.call(attrs, k) || attrs[k] == null) continue;
        var v = attrs[k];
        if (k.slice(0, 2) === "on") e.addEventListener(k.slice(2), v);
        else if (k === "text") e.textContent = v;
        else if (k === "style" && typeof v === "object") for (var s in v) e.style[s] = v[s];
        else e.setAttribute(k, v);
      }
    }
    if (kids != null) {
      if (!Array.isArray(kids)) kids = [kids];
      kids.forEach(function (c) {
        if (c == null) return;
        e.appendChild(typeof c === "string" || typeof c === "number" ?
          document.createTextNode(String(c)) : c);
      });
    }
    return e;
  };

  LL.fmt = function (x, digits) {
    if (x === null || x === undefined || typeof x !== "number" || isNaN(x)) return "–";
    if (x === 0) return "0";
    var a = Math.abs(x), d = digits || 4;
    if (a >= 1e5 || a < 1e-3) return x.toExponential(Math.max(1, d - 2));
    return String(parseFloat(x.toPrecision(d)));
  };
  LL.signed = function (x) { var s = LL.fmt(x); return (x > 0 ? "+" : "") + s; };

  /* whitespace made visible, as lin_lens.decode shows tokens */
  LL.tok = function (s) {
    if (s === null || s === undefined) return "∅";
    s = String(s).replace(/ /g, "·").replace(/\n/g, "↵").replace(/\t/g, "⇥");
    return s || "∅";
  };

  LL.tokenChips = function (tokens, scores, neg) {
    var box = LL.el("div", {class: "ll-toks"});
    (tokens || []).forEach(function (t, i) {
      box.appendChild(LL.el("span", {class: "ll-tok" + (neg ? " neg" : ""),
        title: scores ? String(scores[i]) : null},
        [LL.tok(t), scores ? LL.el("small", null, LL.signed(scores[i])) : null]));
    });
    return box;
  };

  /* A sortable table. columns: [{key, label, num, render(row) -> node|string, title}] */
  LL.table = function (columns, rows, opts) {
    opts = opts || {};
    var table = LL.el("table", {class: "ll-table", id: opts.id || null});
    var thead = LL.el("thead"), tbody = LL.el("tbody"), tr = LL.el("tr");
    var sortKey = opts.sortKey || null, dir = opts.dir || 1, shown = rows.slice();
    columns.forEach(function (c) {
      var th = LL.el("th", {"data-key": c.key, title: c.title || null}, c.label);
      th.addEventListener("click", function () {
        dir = sortKey === c.key ? -dir : (c.num ? -1 : 1);
        sortKey = c.key;
        render();
      });
      tr.appendChild(th);
    });
    thead.appendChild(tr);
    table.appendChild(thead);
    table.appendChild(tbody);
    function value(r, c) { var v = r[c.key]; return v === null || v === undefined ? null : v; }
    function render() {
      if (sortKey) {
        var c = columns.filter(function (x) { return x.key === sortKey; })[0];
        shown.sort(function (a, b) {
          var x = value(a, c), y = value(b, c);
          if (x === null && y === null) return 0;
          if (x === null) return 1;
          if (y === null) return -1;
          if (c.num) return dir * (x - y);
          return dir * String(x).localeCompare(String(y));
        });
      }
      Array.prototype.forEach.call(thead.querySelectorAll("th"), function (th) {
        th.className = th.getAttribute("data-key") === sortKey ? (dir > 0 ? "asc" : "desc") : "";
      });
      tbody.textContent = "";
      shown.forEach(function (r) {
        var row = LL.el("tr", opts.rowAttrs ? opts.rowAttrs(r) : null);
        columns.forEach(function (c) {
          var v = c.render ? c.render(r) : (c.num ? LL.fmt(value(r, c)) : value(r, c));
          row.appendChild(LL.el("td", {class: c.num ? "num" : null}, v == null ? "–" : v));
        });
        tbody.appendChild(row);
      });
    }
    table.filter = function (pred) { shown = rows.filter(pred); render(); };
    render();
    return table;
  };

  LL.header = function (root, title, meta) {
    var head = LL.el("div", {class: "ll-head"}, [LL.el("div", {class: "ll-title"}, title),
      LL.el("div", {class: "ll-meta"}, meta)]);
    root.appendChild(head);
    return head;
  };

  /* "key value · key value" with bold values */
  LL.metaLine = function (pairs) {
    var kids = [];
    pairs.forEach(function (p) {
      if (p[1] === null || p[1] === undefined || p[1] === "") return;
      if (kids.length) kids.push(" · ");
      kids.push(p[0] + " ");
      kids.push(LL.el("b", null, String(p[1])));
    });
    return kids;
  };

  /* The page as a file again, with the reader's state (pins, thresholds) in #ll-state. */
  LL.setState = function (state) {
    var s = document.getElementById("ll-state");
    if (s) s.textContent = JSON.stringify(state).replace(/</g, "\\u003c");
  };
  LL.pageHTML = function (state) {
    LL.setState(state);
    var clone = document.documentElement.cloneNode(true);
    var app = clone.querySelector("#ll-app");
    if (app) { app.textContent = ""; app.className = "ll"; app.removeAttribute("data-ready"); }
    return "<!doctype html>\n" + clone.outerHTML;
  };
  LL.savePage = function (state, name) {
    var html = LL.pageHTML(state);
    var url = URL.createObjectURL(new Blob([html], {type: "text/html"}));
    var a = LL.el("a", {href: url, download: name || "lin_lens_explorer.html"});
    document.body.appendChild(a);
    a.click();
    setTimeout(function () { URL.revokeObjectURL(url); a.remove(); }, 1000);
    return html.length;
  };

  LL.COLOURS = {embed: "#8a8a8a", pos_embed: "#b5b5b5", bias: "#9467bd", head: "#1f77b4",
    attn: "#5fa2d6", neuron: "#ff7f0e", mlp: "#f5b66b", feature: "#2ca02c", error: "#7f7f7f",
    target: "#d62728", other: "#17becf"};
  LL.GROUP_NAMES = {embed: "token", pos_embed: "position", bias: "bias", head: "head",
    attn: "attention", neuron: "neuron", mlp: "MLP", feature: "feature", error: "error",
    target: "target", other: "other"};
})(LL);
