/* Boot: read the page's data and state, start the view for its kind. */
var LL = window.LL = window.LL || {};
(function (LL) {
  "use strict";
  var root = document.getElementById("ll-app");
  try {
    var t0 = performance.now();
    var data = JSON.parse(document.getElementById("ll-data").textContent);
    var stateEl = document.getElementById("ll-state");
    var state = stateEl ? JSON.parse(stateEl.textContent || "{}") : {};
    LL.timings.parse_ms = performance.now() - t0;
    var views = {graph: LL.graphView, map: LL.mapView, corpus: LL.corpusView};
    if (!views[data.kind]) throw new Error("unknown data kind " + JSON.stringify(data.kind));
    views[data.kind](root, data, state || {});
    root.setAttribute("data-ready", "1");
  } catch (err) {
    root.appendChild(LL.el("div", {class: "ll-error"}, "lin_lens explorer: " + (err && err.stack || err)));
    root.setAttribute("data-error", String(err));
    throw err;
  }
})(LL);
