// felix web console (read-only): felix/control/api/console.py serves it at /ui/.
//
// Everything it shows comes from this control plane's REST API, called with the token
// the user signed in with (kept in sessionStorage, sent as Authorization: Bearer):
// the resources (tenants, namespaces, streams, caches, queue groups) every
// RESOURCE_EVERY ticks, and the live numbers every tick (TICK_MS): /v1/node/status
// (admin only) and /v1/node/streams|caches/... for each listed resource. Rates are
// the difference of two samples over the time between them; charts keep HISTORY
// samples. No library, no inline script (the page's CSP forbids both).
"use strict";

(() => {
  const TICK_MS = 2000;
  const RESOURCE_EVERY = 5;
  const HISTORY = 60;
  const MAX_LIVE = 50; // streams and caches whose node status is fetched per tick
  const STORAGE_KEY = "felix.console.token";
  const API = new URL("../v1/", location.href);
  const VIEWS = ["overview", "tenants", "streams", "groups", "caches"];

  const $ = (id) => document.getElementById(id);
  const state = {
    token: sessionStorage.getItem(STORAGE_KEY),
    who: null,
    info: null,
    res: { tenants: [], namespaces: [], streams: [], caches: [], groups: [], denied: {} },
    node: null,
    nodeNote: "",
    refused: {}, // path -> why (403)
    live: { streams: {}, caches: {} },
    prev: {}, // counter samples for rates: key -> {t, v}
    rates: {}, // key -> latest rate
    history: {}, // chart key -> [values]
    ticks: 0,
    timer: null,
    busy: false,
  };

  // -- the API ------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, title, detail) {
      super(`${status} ${title}${detail ? ": " + detail : ""}`);
      this.status = status;
    }
  }

  async function api(path) {
    const headers = { Accept: "application/json" };
    if (state.token) headers.Authorization = "Bearer " + state.token;
    const response = await fetch(new URL(path, API), {
      headers, cache: "no-store", credentials: "omit", referrerPolicy: "no-referrer",
    });
    let body = null;
    try { body = await response.json(); } catch (e) { body = null; }
    if (!response.ok) {
      const title = (body && body.title) || response.statusText || "Error";
      throw new ApiError(response.status, title, (body && body.detail) || "");
    }
    return body;
  }

  const enc = encodeURIComponent;
  const nsPath = (t, ns) => `tenants/${enc(t)}/namespaces/${enc(ns)}`;

  // A list, or [] with the reason noted in res (a tenant token may not list everything;
  // a refusal is not asked again, so the audit log does not fill with it).
  async function list(res, what, path) {
    if (path in state.refused) {
      res.denied[what] = state.refused[path];
      return [];
    }
    try {
      return (await api(path)).items;
    } catch (e) {
      if (e.status === 401) throw e;
      if (e.status === 403) state.refused[path] = e.message;
      res.denied[what] = e.message;
      return [];
    }
  }

  // -- signing in ----------------------------------------------------------------------

  async function start() {
    $("signin-form").addEventListener("submit", signIn);
    $("signout").addEventListener("click", signOut);
    window.addEventListener("hashchange", render);
    try {
      state.who = await api("whoami");
    } catch (e) {
      showSignin(e.status === 401 ? (state.token ? "Your session's token was refused: " + e.message : "") : e.message);
      return;
    }
    enter();
  }

  function showSignin(message) {
    $("signin").hidden = false;
    $("signin-error").textContent = message || "";
    $("token").focus();
  }

  async function signIn(event) {
    event.preventDefault();
    const token = $("token").value.trim();
    $("signin-error").textContent = "";
    if (!token) return;
    state.token = token;
    try {
      state.who = await api("whoami");
    } catch (e) {
      state.token = null;
      $("signin-error").textContent = "Sign-in failed: " + e.message;
      return;
    }
    sessionStorage.setItem(STORAGE_KEY, token);
    $("token").value = "";
    $("signin").hidden = true;
    enter();
  }

  function signOut() {
    sessionStorage.removeItem(STORAGE_KEY);
    location.hash = "";
    location.reload();
  }

  function enter() {
    const who = state.who;
    $("signin").hidden = true;
    $("nav").hidden = false;
    $("signout").hidden = !who.auth_required;
    $("who").textContent = !who.auth_required ? "no authentication (loopback)"
      : who.admin ? "admin" : `tenant ${who.tenant} (${who.subject})`;
    if (!VIEWS.includes(location.hash.slice(1))) location.hash = "#overview";
    render();
    tick();
    state.timer = setInterval(tick, TICK_MS);
  }

  function expired(e) {
    clearInterval(state.timer);
    sessionStorage.removeItem(STORAGE_KEY);
    state.token = null;
    state.who = null;
    for (const id of VIEWS) $("view-" + id).hidden = true;
    $("nav").hidden = true;
    showSignin("Signed out: " + e.message);
  }

  // -- loading -------------------------------------------------------------------------

  async function tick() {
    if (state.busy) return; // the previous refresh is still running: skip this one
    state.busy = true;
    try {
      if (state.ticks % RESOURCE_EVERY === 0) await loadResources();
      state.ticks += 1;
      await loadLive();
      $("banner").hidden = true;
      $("updated").textContent = "Updated " + new Date().toLocaleTimeString();
    } catch (e) {
      if (e.status === 401) return expired(e);
      $("banner").textContent = e.message;
      $("banner").hidden = false;
    } finally {
      state.busy = false;
    }
    render();
  }

  async function loadResources() {
    const res = { tenants: [], namespaces: [], streams: [], caches: [], groups: [], denied: {} };
    state.info = await api("system/info");
    const who = state.who;
    res.tenants = who.tenant ? [{ name: who.tenant }]
      : who.admin ? await list(res, "tenants", "tenants") : [];
    for (const tenant of res.tenants) {
      for (const ns of await list(res, "namespaces", `tenants/${enc(tenant.name)}/namespaces`)) {
        res.namespaces.push({ tenant: tenant.name, name: ns.name });
      }
    }
    await Promise.all(res.namespaces.map(async (ns) => {
      const base = nsPath(ns.tenant, ns.name);
      const [streams, caches] = await Promise.all([
        list(res, "streams", base + "/streams"), list(res, "caches", base + "/caches"),
      ]);
      for (const s of streams) res.streams.push({ tenant: ns.tenant, ns: ns.name, name: s.name, spec: s.spec });
      for (const c of caches) res.caches.push({ tenant: ns.tenant, ns: ns.name, name: c.name, spec: c.spec });
    }));
    await Promise.all(res.streams.map(async (s) => {
      for (const g of await list(res, "groups", `${nsPath(s.tenant, s.ns)}/streams/${enc(s.name)}/groups`)) {
        res.groups.push({ stream: s, name: g.name, spec: g.spec });
      }
    }));
    const byKey = (a, b) => key(a).localeCompare(key(b));
    res.streams.sort(byKey);
    res.caches.sort(byKey);
    state.res = res;
  }

  async function loadLive() {
    const now = performance.now() / 1000;
    if (state.who.admin) {
      try {
        state.node = await api("node/status");
        state.nodeNote = "";
        const totals = state.node.totals || {};
        sample("node.published", now, totals.messages_published, "rate");
        sample("node.delivered", now, totals.messages_delivered, "rate");
        sample("node.connections", now, totals.connections, "gauge");
      } catch (e) {
        if (e.status === 401) throw e;
        state.node = null;
        state.nodeNote = "The node's status is not available: " + e.message;
      }
    } else {
      state.nodeNote = "The node's status is shown to the admin token only.";
    }
    const live = { streams: {}, caches: {} };
    await each(state.res.streams.slice(0, MAX_LIVE), async (s) => {
      const status = await optional(`node/streams/${enc(s.tenant)}/${enc(s.ns)}/${enc(s.name)}`);
      live.streams[key(s)] = status;
      if (status && status.memory) sample("stream." + key(s), now, status.memory.next_offset, "rate");
    });
    await each(state.res.caches.slice(0, MAX_LIVE), async (c) => {
      const status = await optional(`node/caches/${enc(c.tenant)}/${enc(c.ns)}/${enc(c.name)}`);
      live.caches[key(c)] = status;
      if (status && typeof status.hits === "number") {
        sample("cache." + key(c), now, status.hits + status.misses, "rate");
      }
    });
    state.live = live;
  }

  // The node's status of a resource, or null (not held yet, or not reported).
  async function optional(path) {
    try { return await api(path); } catch (e) { if (e.status === 401) throw e; return null; }
  }

  // Run fn over items, four at a time (the node answers status requests one by one).
  async function each(items, fn) {
    const queue = items.slice();
    const worker = async () => { while (queue.length) await fn(queue.shift()); };
    await Promise.all([worker(), worker(), worker(), worker()]);
  }

  // Record a sample: a gauge as is, a counter as its rate since the previous sample.
  function sample(name, t, value, kind) {
    if (typeof value !== "number") return;
    let point = value;
    if (kind === "rate") {
      const prev = state.prev[name];
      state.prev[name] = { t, v: value };
      if (!prev || t <= prev.t) return;
      point = Math.max(0, value - prev.v) / (t - prev.t);
    }
    state.rates[name] = point;
    const series = state.history[name] || (state.history[name] = []);
    series.push(point);
    if (series.length > HISTORY) series.shift();
  }

  // -- rendering -----------------------------------------------------------------------

  const key = (r) => `${r.tenant}/${r.ns}/${r.name}`;
  const dash = "—";
  const num = (v) => (typeof v === "number" ? v.toLocaleString("en-US") : dash);
  const rate = (name) => (name in state.rates ? state.rates[name].toFixed(1) : dash);
  const bytes = (v) => {
    if (typeof v !== "number") return dash;
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (v >= 1024 && i < units.length - 1) { v /= 1024; i += 1; }
    return `${i ? v.toFixed(1) : v} ${units[i]}`;
  };
  const yesNo = (v) => (v === undefined || v === null ? dash : v ? "yes" : "no");

  function render() {
    if (!state.who) return;
    const view = VIEWS.includes(location.hash.slice(1)) ? location.hash.slice(1) : "overview";
    for (const id of VIEWS) $("view-" + id).hidden = id !== view;
    for (const a of $("nav").querySelectorAll("a")) a.classList.toggle("active", a.hash === "#" + view);
    ({ overview: renderOverview, tenants: renderTenants, streams: renderStreams,
      groups: renderGroups, caches: renderCaches })[view]();
  }

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, value);
    for (const child of children) node.append(child instanceof Node ? child : String(child));
    return node;
  }

  // A table: columns are [heading, cell(row), class?]; each row's data-key is rowKey(row),
  // each cell's data-col its heading, so a test (or a user's script) can find a number.
  function table(id, columns, rows, rowKey, empty) {
    const head = el("tr", {}, ...columns.map(([title]) => el("th", {}, title)));
    const body = rows.map((row) => el("tr", { "data-key": rowKey(row) }, ...columns.map(
      ([title, cell, cls]) => el("td", { "data-col": title, class: cls || "" }, cell(row)))));
    if (!rows.length) body.push(el("tr", {}, el("td", { colspan: columns.length, class: "empty" }, empty)));
    $(id).replaceChildren(el("thead", {}, head), el("tbody", {}, ...body));
  }

  function deniedNote(...what) {
    return what.map((w) => state.res.denied[w]).filter(Boolean).join("; ");
  }

  function renderOverview() {
    const node = state.node;
    const info = state.info || {};
    $("node-note").textContent = state.nodeNote;
    const t = (node && node.totals) || {};
    const budgets = (node && node.budgets) || {};
    const restarts = node ? node.children.reduce((n, c) => n + c.restarts, 0) : undefined;
    const facts = [
      ["Version", info.version || dash], ["Region", info.region || dash],
      ["Ready", node ? (node.ready ? "ready" : "not ready: " + node.problems.join("; ")) : dash],
      ["Uptime", node ? duration(node.uptime_s) : dash],
      ["Connections", num(t.connections)],
      ["Published / s", rate("node.published")], ["Delivered / s", rate("node.delivered")],
      ["Streams held", num(t.streams)], ["Caches held", num(t.caches)],
      ["Queue groups", num(t.queue_groups)], ["Restarts", num(restarts)],
      ["Memory", node ? `${bytes(t.memory_used_bytes)} of ${bytes(budgets.memory_bytes)}` : dash],
      ["Disk", node ? `${bytes(t.node_disk_bytes)}${budgets.disk_bytes ? " of " + bytes(budgets.disk_bytes) : ""}` : dash],
      ["Slow consumer events", num(t.slow_consumer_events)],
    ];
    $("node-facts").replaceChildren(...facts.map(([name, value]) => el("div", { "data-fact": name },
      el("dt", {}, name), el("dd", { class: name === "Ready" && node ? (node.ready ? "ok" : "bad") : "" }, value))));
    chart($("chart-published"), state.history["node.published"], 300, 90);
    chart($("chart-delivered"), state.history["node.delivered"], 300, 90);
    chart($("chart-connections"), state.history["node.connections"], 300, 90);
    const children = node ? node.children : [];
    table("processes", [
      ["Process", (c) => c.name], ["PID", (c) => c.pid ?? dash, "num"],
      ["Status", (c) => c.status], ["Restarts", (c) => num(c.restarts), "num"],
      ["Connections", (c) => num((c.stats || {}).connections), "num"],
      ["Requests", (c) => num((c.stats || {}).requests), "num"],
    ], children, (c) => c.name, node ? "No processes" : dash);
  }

  function renderTenants() {
    const { namespaces, streams, caches } = state.res;
    const count = (items, ns) => items.filter((r) => r.tenant === ns.tenant && r.ns === ns.name).length;
    table("tenants", [
      ["Tenant", (n) => n.tenant], ["Namespace", (n) => n.name],
      ["Streams", (n) => count(streams, n), "num"], ["Caches", (n) => count(caches, n), "num"],
    ], namespaces, (n) => `${n.tenant}/${n.name}`, deniedNote("tenants", "namespaces") || "No namespaces");
  }

  function renderStreams() {
    const live = (s) => state.live.streams[key(s)] || {};
    const memory = (s) => live(s).memory || {};
    const groupCount = (s) => state.res.groups.filter((g) => g.stream === s).length;
    table("streams", [
      ["Stream", key], ["Durable", (s) => yesNo(s.spec.durable)],
      ["Records", (s) => num(memory(s).next_offset), "num"],
      ["Retained", (s) => num(memory(s).retained_records), "num"],
      ["Records / s", (s) => rate("stream." + key(s)), "num"],
      ["Rate", (s) => chart(svg(), state.history["stream." + key(s)], 120, 24)],
      ["Subscribers", subscribers, "num"],
      ["Queue groups", groupCount, "num"],
      ["Disk", (s) => bytes(live(s).disk_bytes ?? live(s).bytes), "num"],
    ], state.res.streams, key, deniedNote("streams") || "No streams");
  }

  // Subscribers where the node counts them; else how many gateways hold some.
  function subscribers(s) {
    const live = state.live.streams[key(s)] || {};
    if (typeof live.subscribers === "number") return num(live.subscribers);
    if (typeof live.gateways_watching === "number") return `${live.gateways_watching} gateway(s)`;
    return dash;
  }

  function renderGroups() {
    const rows = [];
    const seen = new Set();
    for (const g of state.res.groups) {
      seen.add(key(g.stream) + "/" + g.name);
      rows.push({ stream: key(g.stream), name: g.name, defined: true, node: groupStatus(g.stream, g.name) });
    }
    for (const s of state.res.streams) { // groups the node holds that were not defined
      for (const [name, status] of Object.entries((state.live.streams[key(s)] || {}).groups || {})) {
        if (!seen.has(key(s) + "/" + name)) rows.push({ stream: key(s), name, defined: false, node: status });
      }
    }
    const n = (g, k) => num((g.node || {})[k]);
    table("groups", [
      ["Stream", (g) => g.stream], ["Group", (g) => g.name], ["Defined", (g) => yesNo(g.defined)],
      ["Open", (g) => yesNo((g.node || {}).open)], ["Members", (g) => n(g, "members"), "num"],
      ["Lag", (g) => n(g, "lag"), "num"], ["Pending", (g) => n(g, "pending"), "num"],
      ["Acked", (g) => n(g, "acked"), "num"], ["Dead-lettered", (g) => n(g, "dead"), "num"],
      ["Dead-letter stream", (g) => (g.node || {}).dead_letter || dash],
      ["Stalled", (g) => yesNo((g.node || {}).stalled)],
    ], rows, (g) => `${g.stream}/${g.name}`, deniedNote("groups", "streams") || "No queue groups");
  }

  function groupStatus(stream, name) {
    return ((state.live.streams[key(stream)] || {}).groups || {})[name] || null;
  }

  function renderCaches() {
    const live = (c) => state.live.caches[key(c)] || {};
    const ratio = (c) => {
      const { hits, misses } = live(c);
      if (typeof hits !== "number" || hits + misses === 0) return dash;
      return (100 * hits / (hits + misses)).toFixed(1) + " %";
    };
    table("caches", [
      ["Cache", key], ["Budget", (c) => bytes(c.spec.budget_bytes), "num"],
      ["Max value", (c) => bytes(c.spec.max_value_bytes), "num"],
      ["Default TTL", (c) => (c.spec.default_ttl_s ? c.spec.default_ttl_s + " s" : dash), "num"],
      ["Entries", (c) => num(live(c).entries), "num"], ["Used", (c) => bytes(live(c).used_bytes), "num"],
      ["Hits", (c) => num(live(c).hits), "num"], ["Misses", (c) => num(live(c).misses), "num"],
      ["Hit rate", ratio, "num"], ["Gets / s", (c) => rate("cache." + key(c)), "num"],
      ["Rate", (c) => chart(svg(), state.history["cache." + key(c)], 120, 24)],
    ], state.res.caches, key, deniedNote("caches") || "No caches");
  }

  function duration(s) {
    if (typeof s !== "number") return dash;
    const d = Math.floor(s / 86400), h = Math.floor(s / 3600) % 24, m = Math.floor(s / 60) % 60;
    return d ? `${d}d ${h}h` : h ? `${h}h ${m}m` : `${m}m ${Math.floor(s % 60)}s`;
  }

  // -- charts: a line over the last HISTORY samples, scaled to the largest -------------

  const SVG = "http://www.w3.org/2000/svg";
  const svg = () => document.createElementNS(SVG, "svg");

  function chart(target, values, width, height) {
    values = values || [];
    const shape = (tag, attrs) => {
      const node = document.createElementNS(SVG, tag);
      for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
      return node;
    };
    target.setAttribute("viewBox", `0 0 ${width} ${height}`);
    target.setAttribute("width", width);
    target.setAttribute("height", height);
    target.setAttribute("data-points", values.length);
    const top = Math.max(...values, 1);
    const big = height > 40;
    const pad = big ? 12 : 2;
    const x = (i) => (width * i) / (HISTORY - 1);
    const y = (v) => height - pad / 2 - ((height - pad) * v) / top;
    const offset = HISTORY - values.length;
    const points = values.map((v, i) => `${x(offset + i).toFixed(1)},${y(v).toFixed(1)}`).join(" ");
    const children = [shape("line", { class: "axis", x1: 0, y1: height - 0.5, x2: width, y2: height - 0.5 })];
    if (values.length > 1) {
      children.push(shape("polygon", {
        class: "area", points: `${x(offset)},${height} ${points} ${x(HISTORY - 1)},${height}`,
      }));
      children.push(shape("polyline", { class: "line", points }));
    }
    if (big) {
      const label = shape("text", { x: 2, y: 10 });
      label.textContent = `max ${top.toFixed(top < 10 ? 1 : 0)}`;
      children.push(label);
    }
    target.replaceChildren(...children);
    return target;
  }

  start();
})();
