"""The page the gateway serves at its root: upload an image, pick an endpoint, see before and after.

One static document (no template engine, no external assets: it works on an air-gapped cluster). It learns the
endpoints from GET models and calls the same routes a client would (multipart upload, `?format=png`), with paths
relative to where the app is mounted, so an app under `route_prefix: /families` works as one at `/`. A bearer
token typed into the page is sent as the Authorization header and kept only in the page.
"""
from __future__ import annotations

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>genray</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><link rel="icon" href="data:,">
<style>
body { font: 15px/1.5 system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #1d2330; }
h1 { margin-bottom: .2em; } .muted { color: #5a6475; } form { display: flex; gap: 1em; flex-wrap: wrap;
  align-items: end; background: #f5f7fa; padding: 1em; border-radius: 6px; margin: 1em 0; }
label { display: flex; flex-direction: column; font-size: 90%; gap: .2em; }
select, input, button { font: inherit; padding: .3em .5em; } button { cursor: pointer; }
.pair { display: flex; gap: 1.5em; flex-wrap: wrap; } figure { margin: 0; }
figure img { max-width: 500px; min-width: 160px; image-rendering: pixelated; border: 1px solid #d5dbe6; }
figcaption { color: #5a6475; font-size: 90%; } #status { min-height: 1.5em; } .error { color: #b3261e; }
pre { background: #f5f7fa; padding: .8em; border-radius: 4px; overflow-x: auto; }
</style></head>
<body>
<h1>genray</h1>
<p class="muted">Models served by this Ray Serve app. Upload an image, pick an endpoint, compare.
The same routes take <code>curl -F image=@photo.png URL</code>; the API is at <a id="docs" href="docs">docs</a>.</p>
<form id="form">
  <label>endpoint <select id="endpoint" required></select></label>
  <label>image <input id="file" type="file" accept="image/*"></label>
  <label>bearer token (if the server wants one) <input id="token" type="password" autocomplete="off"></label>
  <button id="run" type="submit">Run</button>
</form>
<div id="status" class="muted">loading the model list...</div>
<div class="pair">
  <figure><img id="before" alt="" hidden><figcaption id="before-caption"></figcaption></figure>
  <figure><img id="after" alt="" hidden><figcaption id="after-caption"></figcaption></figure>
</div>
<pre id="json" hidden></pre>
<script>
"use strict";
const base = location.pathname.endsWith("/") ? location.pathname : location.pathname + "/";
const $ = (id) => document.getElementById(id);
$("docs").href = base + "docs";
const routes = {};  // option value -> {path, method, upload, answers}

function headers() {
  const token = $("token").value.trim();
  return token ? {"Authorization": "Bearer " + token} : {};
}

function status(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "muted";
}

function add(value, label, route) {
  routes[value] = route;
  const option = document.createElement("option");
  option.value = value;
  option.textContent = label;
  $("endpoint").appendChild(option);
}

async function loadModels() {
  const response = await fetch(base + "models", {headers: headers()});
  if (!response.ok) {
    status("GET models: " + response.status + " " + (await response.text()), true);
    return;
  }
  const listing = await response.json();
  $("endpoint").replaceChildren();
  for (const [name, info] of Object.entries(listing.models)) {
    const what = info.family + ", " + info.task;
    if (info.kind === "image") add(name, name + " (" + what + ")", {path: name, upload: true, answers: "image"});
    if (info.kind === "classifier") add(name, name + " (" + what + ")",
      {path: "classify/" + name, upload: true, answers: "json"});
    if (info.kind === "generator") add(name, name + " (" + what + ", samples)",
      {path: "generate/" + name + "?n=16&seed=1", upload: false, answers: "image"});
  }
  for (const name of Object.keys((listing.styles || {}).styles || {})) {
    add("style/" + name, "style " + name, {path: "style/" + name, upload: true, answers: "image"});
  }
  status(Object.keys(routes).length + " endpoints", false);
}

async function run(event) {
  event.preventDefault();
  const route = routes[$("endpoint").value];
  const file = $("file").files[0];
  if (!route) return status("no endpoint", true);
  if (route.upload && !file) return status("choose an image first", true);
  $("json").hidden = true;
  $("after").hidden = true;
  if (route.upload) {
    $("before").src = URL.createObjectURL(file);
    $("before").hidden = false;
    $("before-caption").textContent = "before: " + file.name;
  }
  const options = {method: route.upload ? "POST" : "GET", headers: headers()};
  if (route.upload) {
    options.body = new FormData();
    options.body.append("image", file);
  }
  const url = base + route.path + (route.answers === "image" ? (route.path.includes("?") ? "&" : "?") + "format=png" : "");
  status("running " + route.path + " ...", false);
  const started = performance.now();
  const response = await fetch(url, options);
  const seconds = ((performance.now() - started) / 1000).toFixed(2);
  if (!response.ok) {
    let detail = await response.text();
    try { detail = JSON.parse(detail).detail; } catch (_) { /* not JSON */ }
    return status(response.status + ": " + detail, true);
  }
  const model = response.headers.get("X-Genray-Model-Digest") || "";
  if (route.answers === "json") {
    $("json").textContent = JSON.stringify(await response.json(), null, 2);
    $("json").hidden = false;
  } else {
    const after = $("after");
    after.onload = () => {
      $("after-caption").textContent = "after: " + after.naturalWidth + "x" + after.naturalHeight + " PNG, " +
        seconds + " s, model " + model.slice(0, 19);
    };
    after.src = URL.createObjectURL(await response.blob());
    after.hidden = false;
  }
  status("done in " + seconds + " s", false);
}

$("form").addEventListener("submit", run);
$("token").addEventListener("change", loadModels);
loadModels();
</script>
</body></html>
"""
