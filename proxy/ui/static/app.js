// The /ui page: models, live events, logs and the last requests, from the proxy's own endpoints.
// Plain JavaScript, no framework, no build step. Everything the server sends is shown with textContent
// (never innerHTML). The key lives in sessionStorage and goes in the Authorization header only:
// EventSource cannot send headers, so the SSE and log streams are read with fetch() and a small parser.
"use strict";

const KEY_ITEM = "proxy-ui-key";
const MAX_FOLLOWS = 3; // log streams open at once (HTTP/1.1 gives a page 6 connections to one host)
const LOG_LINES = 500; // lines kept per log tail on the page
const MAX_REQUESTS = 100;

const ui = {
  models: new Map(), // name -> status as /status gives it
  rows: new Map(), // name -> {row, cells, logRow, pre, follow}
  requests: [], // request_end events, oldest first
  offset: 0, // server clock minus this browser's, in seconds (from the Date header)
  admin: false,
  events: null, // AbortController of the event stream
  refreshTimer: null,
  refreshing: false,
  refreshAgain: false,
  pollTimer: null,
  follows: [], // names whose log is followed, oldest first
  node: null, // this node's name when the proxy is in a cluster (its answers' X-Served-By), else null
  clusterTimer: null,
};

const $ = (id) => document.getElementById(id);

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v;
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

function key() {
  return sessionStorage.getItem(KEY_ITEM);
}

function headers() {
  const k = key();
  return k ? { Authorization: "Bearer " + k } : {};
}

function api(path, options) {
  const opts = Object.assign({}, options || {});
  opts.headers = Object.assign({}, headers(), opts.headers || {});
  opts.cache = "no-store";
  return fetch(path, opts); // relative: works behind a reverse proxy's path prefix
}

async function reason(resp) {
  // an error body in any of the proxy's dialects -> its message
  const text = await resp.text();
  try {
    const body = JSON.parse(text);
    const err = body.error;
    if (err && typeof err === "object" && err.message) return String(err.message);
    if (typeof err === "string") return err;
  } catch (_) {
    // not JSON: the text itself
  }
  return text || resp.status + " " + resp.statusText;
}

function notice(text, kind) {
  const n = $("notice");
  n.textContent = text || "";
  n.className = "notice " + (kind || "");
  n.hidden = !text;
}

function setLive(state, text) {
  const live = $("live");
  live.dataset.state = state;
  live.textContent = text;
}

// ---- formatting ----

function bytes(n) {
  if (n === null || n === undefined) return "";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  let v = n;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i += 1;
  }
  return (i === 0 ? v : v.toFixed(v >= 100 ? 0 : 1)) + " " + units[i];
}

function duration(seconds) {
  const s = Math.max(0, Math.round(seconds));
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  const rest = s % 60;
  if (h) return h + "h" + String(m).padStart(2, "0") + "m";
  if (m) return m + "m" + String(rest).padStart(2, "0") + "s";
  return rest + "s";
}

function now() {
  return Date.now() / 1000 + ui.offset; // the server's clock, as well as we know it
}

function memoryText(m) {
  const parts = [];
  if (m.need) {
    let need = "need " + bytes(m.need.ram) + " RAM";
    if (m.need.vram) need += " + " + bytes(m.need.vram) + " VRAM";
    parts.push(need + " (" + m.need.source + ")");
  }
  if (m.memory_bytes !== null && m.memory_bytes !== undefined) {
    let used = "uses " + bytes(m.memory_bytes);
    if (m.vram_bytes) used += " + " + bytes(m.vram_bytes) + " VRAM";
    parts.push(used);
  }
  return parts.join(" · ") || "—";
}

function keepAliveText(m) {
  if (m.state !== "ready") return m.keep_alive;
  if (m.expires_at === "never") return "never (pinned)";
  if (m.expires_at === null || m.expires_at === undefined) return "busy · " + m.keep_alive;
  return "unloads in " + duration(m.expires_at - now());
}

// ---- models ----

function modelRow(name) {
  let r = ui.rows.get(name);
  if (r) return r;
  const cells = {};
  const row = el("tr", { "data-model": name });
  for (const c of ["name", "state", "backend", "where", "memory", "inflight", "waiting", "keepalive", "actions"]) {
    cells[c] = el("td", { class: c });
    row.append(cells[c]);
  }
  cells.name.append(el("span", { class: "name" }, name), el("span", { class: "aliases" }));
  cells.state.append(el("span", { class: "badge" }), el("progress", { max: "1", hidden: "" }), el("span", { class: "phase" }));
  const load = el("button", { type: "button", class: "load" }, "Load");
  const unload = el("button", { type: "button", class: "unload" }, "Unload");
  const logs = el("button", { type: "button", class: "logs", "aria-expanded": "false" }, "Logs");
  cells.actions.append(load, unload, logs);
  const message = el("div", { class: "message error", role: "alert" });
  cells.name.append(message);
  const pre = el("pre", { class: "log" });
  const logRow = el("tr", { class: "logrow", "data-log": name, hidden: "" }, el("td", { colspan: "9" }, pre));
  load.addEventListener("click", () => action(name, "load", load));
  unload.addEventListener("click", () => action(name, "unload", unload));
  logs.addEventListener("click", () => toggleLog(name));
  r = { row, cells, logRow, pre, message, logsButton: logs, follow: null };
  ui.rows.set(name, r);
  $("models").tBodies[0].append(row, logRow);
  return r;
}

function renderModel(m) {
  const r = modelRow(m.name);
  const c = r.cells;
  r.row.dataset.state = m.state;
  c.name.querySelector(".aliases").textContent = m.aliases && m.aliases.length ? m.aliases.join(", ") : "";
  c.state.querySelector(".badge").textContent = m.state;
  const bar = c.state.querySelector("progress");
  const loading = m.state === "starting";
  bar.hidden = !loading;
  if (loading && typeof m.progress === "number") bar.value = m.progress;
  else if (loading) bar.removeAttribute("value");
  const pct = loading && typeof m.progress === "number" ? Math.round(m.progress * 100) + "% " : "";
  c.state.querySelector(".phase").textContent = loading ? pct + (m.phase || "") : "";
  c.backend.textContent = m.kind ? m.backend + " (" + m.kind + ")" : m.backend;
  c.where.textContent = m.device || "—";
  c.memory.textContent = memoryText(m);
  c.inflight.textContent = String(m.in_flight);
  c.waiting.textContent = String(m.queued || 0);
  c.waiting.title = m.waiting || "";
  c.keepalive.textContent = keepAliveText(m);
  const err = m.last_error && m.state === "failed" ? m.last_error : "";
  if (err) r.message.textContent = err;
}

function renderModels() {
  for (const m of ui.models.values()) renderModel(m);
  for (const [name, r] of ui.rows) {
    if (!ui.models.has(name)) {
      stopFollow(name);
      r.row.remove();
      r.logRow.remove();
      ui.rows.delete(name);
    }
  }
}

function setModels(list) {
  ui.models = new Map(list.map((m) => [m.name, m]));
  renderModels();
}

async function refresh() {
  // one /status call at a time, so an older answer never overwrites a newer one
  ui.refreshTimer = null;
  if (ui.refreshing) {
    ui.refreshAgain = true;
    return;
  }
  ui.refreshing = true;
  try {
    const resp = await api("status");
    if (resp.status === 401) return askKey(await reason(resp));
    if (!resp.ok) return notice("GET /status: " + (await reason(resp)), "error");
    const date = resp.headers.get("date");
    if (date) ui.offset = Date.parse(date) / 1000 - Date.now() / 1000;
    setModels((await resp.json()).models);
  } finally {
    ui.refreshing = false;
    if (ui.refreshAgain) {
      ui.refreshAgain = false;
      refreshSoon();
    }
  }
}

function refreshSoon() {
  // events tell what changed; /status has the rest (memory, in flight, expiry): at most one call per 300 ms
  if (ui.refreshTimer === null) ui.refreshTimer = setTimeout(refresh, 300);
}

async function action(name, verb, button) {
  const r = ui.rows.get(name);
  r.message.textContent = "";
  button.disabled = true;
  try {
    const resp = await api(verb + "/" + encodeURIComponent(name), { method: "POST" });
    if (resp.status === 401) return askKey(await reason(resp));
    if (!resp.ok) r.message.textContent = verb + " refused (" + resp.status + "): " + (await reason(resp));
  } catch (e) {
    r.message.textContent = verb + " failed: " + e;
  } finally {
    button.disabled = false;
    refreshSoon();
  }
}

// ---- streams ----

async function readLines(resp, onLine) {
  const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += value;
    let i;
    while ((i = buf.indexOf("\n")) >= 0) {
      onLine(buf.slice(0, i).replace(/\r$/, ""));
      buf = buf.slice(i + 1);
    }
  }
}

async function readSSE(resp, onEvent) {
  // Server-Sent Events: "event:" names it, "data:" lines carry it, ":" lines are comments, a blank line ends it
  let name = "message";
  let data = [];
  await readLines(resp, (line) => {
    if (line === "") {
      if (data.length) onEvent(name, data.join("\n"));
      name = "message";
      data = [];
    } else if (line.startsWith(":")) {
      // a comment (": ping")
    } else {
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      let value = colon < 0 ? "" : line.slice(colon + 1);
      if (value.startsWith(" ")) value = value.slice(1);
      if (field === "event") name = value;
      else if (field === "data") data.push(value);
    }
  });
}

function onEvent(name, raw) {
  const e = JSON.parse(raw);
  const m = e.model !== undefined ? ui.models.get(e.model) : undefined;
  switch (name) {
    case "snapshot":
      setModels(e.models);
      ui.requests = e.requests.slice(-MAX_REQUESTS);
      renderRequests();
      refreshSoon(); // the snapshot has no worker reports nor the server's clock
      return;
    case "state":
      if (m) {
        m.state = e.new;
        if (e.new !== "starting") m.progress = null;
        renderModel(m);
      }
      break;
    case "load_progress":
      if (m) {
        m.state = "starting";
        m.progress = e.progress;
        m.phase = e.detail;
        renderModel(m);
      }
      return;
    case "request_end":
      if (!e.model && e.status < 400) break; // as /status/requests: requests that named a model, or failed
      ui.requests.push(e);
      if (ui.requests.length > MAX_REQUESTS) ui.requests.shift();
      renderRequests();
      break;
    case "dropped":
      loadRequests();
      break;
    default:
      break;
  }
  refreshSoon();
}

async function connectEvents() {
  const controller = new AbortController();
  ui.events = controller;
  let resp;
  try {
    resp = await api("status/events", { signal: controller.signal });
  } catch (e) {
    return reconnect(controller, "event stream failed: " + e);
  }
  if (resp.status === 403 || resp.status === 401) {
    // a user key: no events, logs nor request history; poll /status instead
    ui.admin = false;
    const why = await reason(resp);
    setLive("poll", "polling");
    notice("Live updates, logs, load and unload need an admin key (" + why + "); showing /status every 5 s.", "warn");
    $("requests-note").textContent = "The last requests need an admin key.";
    $("requests-note").hidden = false;
    ui.pollTimer = setInterval(refresh, 5000);
    return;
  }
  if (!resp.ok) return reconnect(controller, "GET /status/events: " + (await reason(resp)));
  ui.admin = true;
  setLive("on", "live");
  notice("");
  startCluster(); // the nodes: GET /cluster is an admin's
  try {
    await readSSE(resp, onEvent);
  } catch (e) {
    if (controller.signal.aborted) return;
  }
  reconnect(controller, "event stream ended");
}

function reconnect(controller, why) {
  if (controller.signal.aborted) return;
  setLive("off", "reconnecting");
  notice(why + "; reconnecting", "warn");
  setTimeout(() => {
    if (!controller.signal.aborted) connectEvents();
  }, 2000);
}

async function loadRequests() {
  const resp = await api("status/requests");
  if (resp.ok) {
    ui.requests = (await resp.json()).requests.slice(-MAX_REQUESTS);
    renderRequests();
  }
}

// ---- logs ----

function appendLog(r, line) {
  const pre = r.pre;
  const atEnd = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
  pre.append(document.createTextNode(line + "\n"));
  while (pre.childNodes.length > LOG_LINES) pre.firstChild.remove();
  if (atEnd) pre.scrollTop = pre.scrollHeight;
}

function toggleLog(name) {
  const r = ui.rows.get(name);
  if (r.follow) stopFollow(name);
  else startFollow(name);
}

function stopFollow(name) {
  const r = ui.rows.get(name);
  if (!r || !r.follow) return;
  r.follow.abort();
  r.follow = null;
  r.logRow.hidden = true;
  r.logsButton.setAttribute("aria-expanded", "false");
  ui.follows = ui.follows.filter((n) => n !== name);
}

async function startFollow(name) {
  while (ui.follows.length >= MAX_FOLLOWS) stopFollow(ui.follows[0]);
  const r = ui.rows.get(name);
  const controller = new AbortController();
  r.follow = controller;
  ui.follows.push(name);
  r.pre.textContent = "";
  r.logRow.hidden = false;
  r.logsButton.setAttribute("aria-expanded", "true");
  try {
    const resp = await api("logs/" + encodeURIComponent(name) + "?follow=true&lines=200", { signal: controller.signal });
    if (!resp.ok) {
      appendLog(r, "logs: " + resp.status + " " + (await reason(resp)));
      return;
    }
    await readLines(resp, (line) => appendLog(r, line));
  } catch (e) {
    if (!controller.signal.aborted) appendLog(r, "log stream failed: " + e);
  }
}

// ---- last requests ----

function renderRequests() {
  const body = $("requests").tBodies[0];
  const rows = [];
  for (const e of ui.requests.slice().reverse()) {
    const generating = e.ttft !== null && e.seconds > e.ttft ? e.seconds - e.ttft : e.seconds;
    const rate = e.tokens && generating > 0 ? (e.tokens / generating).toFixed(1) : "";
    const row = el(
      "tr",
      { class: e.status >= 400 ? "failed" : "" },
      el("td", {}, new Date(e.at * 1000).toLocaleTimeString()),
      el("td", {}, e.model || "—"),
      el("td", {}, e.method + " " + e.route),
      el("td", {}, e.status),
      el("td", {}, e.seconds.toFixed(2) + " s"),
      el("td", {}, e.tokens === null ? "" : e.tokens),
      el("td", {}, rate),
    );
    rows.push(row);
  }
  body.replaceChildren(...rows);
}

// ---- the cluster (GET /cluster, an admin's: shown only when the proxy is a node of one) ----

const CLUSTER_EVERY = 2000; // ms between two GET /cluster

function freeText(n) {
  const parts = [bytes(n.free_ram) + " RAM"];
  (n.free_vram || []).forEach((v, i) => parts.push(bytes(v) + " VRAM on GPU " + i));
  return parts.join(" · ");
}

function modelsText(n) {
  // every model the node can serve, with its state where it is not stopped
  const states = new Map((n.models || []).map((m) => [m.name, m.state]));
  return (n.catalog || [])
    .map((name) => {
      const state = states.get(name);
      return state && state !== "stopped" ? name + " (" + state + ")" : name;
    })
    .join(", ");
}

function renderCluster(data) {
  const rows = data.nodes.map((n) =>
    el(
      "tr",
      { "data-node": n.node, "data-alive": String(n.alive) },
      el("td", { class: "node" }, n.node + (n.node === data.here ? " (this node)" : "")),
      el("td", { class: "alive" }, n.alive ? "alive" : "dead"),
      el("td", { class: "age" }, n.age.toFixed(1) + " s"),
      el("td", { class: "models" }, modelsText(n)),
      el("td", { class: "free" }, freeText(n)),
      el("td", { class: "advertise" }, n.advertise),
    ),
  );
  $("cluster").tBodies[0].replaceChildren(...rows);
  $("cluster-section").hidden = false;
}

async function loadCluster() {
  let resp;
  try {
    resp = await api("cluster");
  } catch (e) {
    return; // the next round tries again
  }
  if (!resp.ok) {
    stopCluster();
    $("cluster-section").hidden = true;
    return;
  }
  renderCluster(await resp.json());
}

function startCluster() {
  if (!ui.node || ui.clusterTimer !== null) return;
  loadCluster();
  ui.clusterTimer = setInterval(loadCluster, CLUSTER_EVERY);
}

function stopCluster() {
  if (ui.clusterTimer !== null) clearInterval(ui.clusterTimer);
  ui.clusterTimer = null;
}

// ---- keys and start ----

function askKey(why) {
  stop();
  $("main").hidden = true;
  $("keyform").hidden = false;
  $("keyreason").textContent = why || "";
  $("forget").hidden = !key();
  setLive("off", "no key");
  $("key").focus();
}

function stop() {
  if (ui.events) ui.events.abort();
  ui.events = null;
  if (ui.pollTimer !== null) clearInterval(ui.pollTimer);
  ui.pollTimer = null;
  stopCluster();
  for (const name of ui.follows.slice()) stopFollow(name);
}

async function start() {
  stop();
  notice("");
  $("requests-note").hidden = true;
  const resp = await api("status");
  if (resp.status === 401) return askKey(await reason(resp));
  if (!resp.ok) return notice("GET /status: " + (await reason(resp)), "error");
  $("keyform").hidden = true;
  $("main").hidden = false;
  $("forget").hidden = !key();
  const date = resp.headers.get("date");
  if (date) ui.offset = Date.parse(date) / 1000 - Date.now() / 1000;
  ui.node = resp.headers.get("x-served-by"); // only a node of a cluster sends it
  setModels((await resp.json()).models);
  connectEvents();
}

document.addEventListener("DOMContentLoaded", () => {
  $("keyform").addEventListener("submit", (ev) => {
    ev.preventDefault();
    sessionStorage.setItem(KEY_ITEM, $("key").value.trim());
    $("key").value = "";
    start();
  });
  $("forget").addEventListener("click", () => {
    sessionStorage.removeItem(KEY_ITEM);
    askKey("");
  });
  setInterval(() => {
    // the keep_alive countdown, between updates from the server
    for (const m of ui.models.values()) {
      const r = ui.rows.get(m.name);
      if (r) r.cells.keepalive.textContent = keepAliveText(m);
    }
  }, 1000);
  start();
});
