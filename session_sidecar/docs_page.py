"""`GET /docs`: a small page that lists the operations of `/openapi.json` and tries them.

Self-contained on purpose: the machines that run the service often reach no CDN, so the
page ships its script and style inline, and its Content-Security-Policy admits exactly
those two (by hash) and requests to this origin, nothing else.
"""

from __future__ import annotations

import base64
import hashlib

_STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; padding: 0 1rem; }
section { border: 1px solid #ccc; border-radius: 6px; padding: 0.5rem 1rem; margin: 1rem 0; }
code, pre, input { font-family: ui-monospace, monospace; }
input { width: 100%; box-sizing: border-box; padding: 0.3rem; }
pre { background: #f4f4f4; padding: 0.5rem; white-space: pre-wrap; word-break: break-all; }
.get { font-weight: bold; color: #06c; }
"""

_SCRIPT = """
"use strict";
function el(tag, props, ...children) {
  const node = Object.assign(document.createElement(tag), props || {});
  node.append(...children);
  return node;
}
function schemaOf(spec, schema) {
  const ref = schema && schema.$ref;
  return ref ? spec.components.schemas[ref.split("/").pop()] : schema;
}
function fields(spec, op) {
  const ok = op.responses["200"];
  const schema = schemaOf(spec, ok && ok.content["application/json"].schema);
  const list = el("ul");
  for (const [name, prop] of Object.entries((schema && schema.properties) || {})) {
    list.append(el("li", {}, el("code", {textContent: name}), " " + (prop.description || "")));
  }
  return list;
}
function operation(spec, base, path, method, op) {
  const inputs = {};
  const form = el("form");
  for (const p of op.parameters || []) {
    inputs[p.name] = el("input", {name: p.name, required: p.required, placeholder: p.schema.pattern || ""});
    if (p.schema.maxLength) inputs[p.name].maxLength = p.schema.maxLength;
    form.append(el("label", {}, p.name + " (" + (p.description || p.in) + ")", inputs[p.name]));
  }
  const out = el("pre", {textContent: "(no request sent yet)"});
  form.append(el("button", {textContent: "Send"}));
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    let url = base + path;
    for (const [name, input] of Object.entries(inputs)) {
      url = url.replace("{" + name + "}", encodeURIComponent(input.value));
    }
    const headers = {Accept: "application/json"};
    const token = document.getElementById("token").value.trim();
    if (token) headers.Authorization = "Bearer " + token;
    out.textContent = method.toUpperCase() + " " + url + " ...";
    try {
      const response = await fetch(url, {method: method.toUpperCase(), headers});
      const shown = ["x-request-id", "retry-after", "www-authenticate", "etag", "cache-control"]
        .filter((h) => response.headers.has(h))
        .map((h) => h + ": " + response.headers.get(h));
      let body = await response.text();
      try { body = JSON.stringify(JSON.parse(body), null, 2); } catch (_) { /* not JSON: as is */ }
      out.textContent = [response.status + " " + response.statusText, ...shown, "", body].join("\\n");
    } catch (error) {
      out.textContent = String(error);
    }
  });
  const statuses = el("ul");
  for (const [status, response] of Object.entries(op.responses)) {
    statuses.append(el("li", {}, el("code", {textContent: status}), " " + response.description));
  }
  return el("section", {},
    el("h2", {}, el("span", {className: method, textContent: method.toUpperCase()}), " ",
       el("code", {textContent: base + path})),
    el("p", {textContent: op.summary + " (operationId " + op.operationId + ")"}),
    el("h3", {textContent: "Fields of a 200 answer"}), fields(spec, op),
    el("h3", {textContent: "Statuses"}), statuses,
    el("h3", {textContent: "Try it"}), form, out);
}
async function main() {
  const spec = await (await fetch("openapi.json")).json();
  document.getElementById("title").textContent = spec.info.title + " " + spec.info.version;
  const base = spec.servers && spec.servers.length ? spec.servers[0].url : "";
  const ops = document.getElementById("ops");
  for (const [path, item] of Object.entries(spec.paths)) {
    for (const [method, op] of Object.entries(item)) ops.append(operation(spec, base, path, method, op));
  }
}
main().catch((error) => {
  document.getElementById("ops").textContent = "Cannot load openapi.json: " + error;
});
"""


def _sha256(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


HTML = f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>session-sidecar API</title>
<style>{_STYLE}</style>
</head>
<body>
<h1 id="title">session-sidecar</h1>
<p>The operations of <a href="openapi.json">openapi.json</a>. Timestamps are milliseconds since
the Unix epoch. Without a token, a service in development mode answers as its default user.</p>
<label>Bearer token <input id="token" type="password" autocomplete="off"></label>
<div id="ops">Loading openapi.json ...</div>
<script>{_SCRIPT}</script>
</body>
</html>
"""

CSP = "; ".join(
    (
        "default-src 'none'",
        f"script-src {_sha256(_SCRIPT)}",
        f"style-src {_sha256(_STYLE)}",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    )
)
