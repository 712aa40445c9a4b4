#!/usr/bin/env bash
# Re-fetch the explorer's vendored JavaScript (d3-zoom and the d3 modules it needs) from the npm
# registry: each module's published minified UMD build and its LICENSE, unchanged, into
# lin_lens/_explorer/static/vendor/. Versions are pinned here; VENDOR.txt records them with the
# registry's integrity hashes and the files' sha256. Needs npm and network (install time only).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$ROOT/lin_lens/_explorer/static/vendor"
# dependency order: each module's UMD build reads the ones before it from the global d3
MODULES="d3-dispatch@3.0.2 d3-selection@3.0.1 d3-color@3.1.1 d3-interpolate@3.0.2 d3-ease@3.0.2
d3-timer@3.0.2 d3-transition@3.0.2 d3-drag@3.0.1 d3-zoom@3.0.1"
TMP="$(mktemp -d)"; trap 'rm -rf "$TMP"' EXIT
mkdir -p "$OUT"; rm -f "$OUT"/*.min.js "$OUT"/*.LICENSE
{
  echo "# d3 modules vendored for the explorer (npm registry releases; see scripts/vendor_explorer_js.sh)"
  echo "# order name@version integrity sha256(min.js)"
} >"$OUT/VENDOR.txt"
for spec in $MODULES; do
  name="${spec%@*}"
  (cd "$TMP" && npm pack "$spec" --silent >/dev/null)
  tgz="$TMP/${name}-${spec#*@}.tgz"; mkdir -p "$TMP/$name"; tar xzf "$tgz" -C "$TMP/$name"
  cp "$TMP/$name/package/dist/$name.min.js" "$OUT/$name.min.js"
  cp "$TMP/$name/package/LICENSE" "$OUT/$name.LICENSE"
  echo "$spec $(npm view "$spec" dist.integrity) $(sha256sum "$OUT/$name.min.js" | cut -d' ' -f1)" >>"$OUT/VENDOR.txt"
done
echo "vendored into $OUT"
