// mayfly web UI: a client of the gateway's /v1 API, logged in with a session cookie.
// Every element is built with the DOM API (no innerHTML): text from the server is never
// parsed as markup.
"use strict";

const $ = (sel) => document.querySelector(sel);
let me = null;          // {tenant, role, name, system}
let cleanup = [];       // timers and streams of the current page

function el(tag, attrs, ...kids) {
  const svg = ["svg", "g", "rect", "text", "path", "title", "line", "defs", "marker", "polygon"].includes(tag);
  const n = svg ? document.createElementNS("http://www.w3.org/2000/svg", tag) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) n.addEventListener(k.slice(2), v);
    else if (k === "class") n.setAttribute("class", v);
    else n.setAttribute(k, v === true ? "" : v);
  }
  for (const k of kids.flat()) {
    if (k === undefined || k === null || k === false) continue;
    n.append(k instanceof Node ? k : document.createTextNode(String(k)));
  }
  return n;
}

async function api(path, opts = {}) {
  const headers = Object.assign({ accept: "application/json" }, opts.headers || {});
  if (opts.method && opts.method !== "GET") headers["x-mayfly-ui"] = "1";
  if (opts.body !== undefined) headers["content-type"] = "application/json";
  const r = await fetch(path, {
    method: opts.method || "GET",
    headers,
    body: opts.body === undefined ? undefined : JSON.stringify(opts.body),
    credentials: "same-origin",
  });
  const text = await r.text();
  let body = null;
  try { body = text ? JSON.parse(text) : null; } catch (_) { body = { detail: text }; }
  if (r.status === 401 && path !== "/ui/session") { showLogin("Your session has ended: log in again."); }
  if (!r.ok) {
    const e = new Error((body && (body.detail || body.title)) || r.statusText);
    e.status = r.status; e.code = body && body.code; e.body = body;
    throw e;
  }
  return body;
}

const when = (ms) => (ms ? new Date(ms).toLocaleString() : "—");
const ago = (ms) => {
  if (!ms) return "—";
  const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
  return s < 60 ? `${s}s ago` : s < 3600 ? `${Math.round(s / 60)}m ago` : `${Math.round(s / 3600)}h ago`;
};
const badge = (s) => el("span", { class: `badge ${s}` }, s);
const short = (id) => String(id || "").slice(0, 13);

function every(ms, f) {
  f();
  const t = setInterval(f, ms);
  cleanup.push(() => clearInterval(t));
}

function errorBox(e) {
  return el("p", { class: "error" }, e.code ? `${e.code}: ${e.message}` : e.message);
}

// ---------- login ----------

function showLogin(msg) {
  me = null;
  for (const f of cleanup) f();
  cleanup = [];
  $("#top").hidden = true;
  $("#view").replaceChildren();
  $("#login").hidden = false;
  $("#login-error").textContent = msg || "";
  $("#token").focus();
}

async function login(ev) {
  ev.preventDefault();
  const token = $("#token").value.trim();
  try {
    await api("/ui/session", { method: "POST", body: { token } });
    $("#token").value = "";
    await start();
  } catch (e) {
    $("#login-error").textContent = e.status === 401 ? "Unknown token." : e.message;
  }
}

async function logout() {
  await fetch("/ui/session", { method: "DELETE", credentials: "same-origin" });
  showLogin("Logged out.");
}

async function start() {
  try {
    me = await api("/v1/whoami");
  } catch (e) {
    showLogin(e.status === 401 ? "" : e.message);
    return;
  }
  $("#login").hidden = true;
  $("#top").hidden = false;
  $("#who").textContent = `${me.name} · ${me.tenant} · ${me.role}`;
  route();
}

// ---------- router ----------

const pages = [
  [/^#\/executions\/([^/]+)$/, (id) => executionPage(decodeURIComponent(id)), "executions"],
  [/^#\/executions$/, () => executionsPage(), "executions"],
  [/^#\/catalog\/(.+)$/, (p) => playbookPage(decodeURIComponent(p)), "catalog"],
  [/^#\/catalog$/, () => catalogPage(), "catalog"],
  [/^#\/keychain$/, () => keychainPage(), "keychain"],
  [/^#\/workers$/, () => workersPage(), "workers"],
  [/^#\/rollouts$/, () => rolloutsPage(), "rollouts"],
  [/^#\/actors$/, () => actorsPage(), "actors"],
];

function route() {
  if (!me) return;
  for (const f of cleanup) f();
  cleanup = [];
  const hash = location.hash || "#/executions";
  for (const [re, page, nav] of pages) {
    const m = hash.match(re);
    if (m) {
      for (const a of document.querySelectorAll("[data-nav]")) a.classList.toggle("active", a.dataset.nav === nav);
      $("#view").replaceChildren();
      page(...m.slice(1)).catch((e) => $("#view").append(errorBox(e)));
      return;
    }
  }
  location.hash = "#/executions";
}

// ---------- executions ----------

async function executionsPage() {
  const view = $("#view");
  const status = el("select", { id: "f-status" },
    ["", "running", "completed", "failed", "cancelled"].map((s) => el("option", { value: s }, s || "any status")));
  const path = el("input", { id: "f-path", type: "text", placeholder: "playbook path contains…" });
  const body = el("tbody", { id: "executions" });
  const startCard = el("div", { class: "card" });
  view.append(
    el("h1", {}, "Executions"),
    startCard,
    el("div", { class: "card" },
      el("div", { class: "row" }, el("div", {}, el("label", {}, "Status"), status), el("div", { class: "grow" }, el("label", {}, "Playbook"), path)),
      el("table", {}, el("thead", {}, el("tr", {}, ["Execution", "Playbook", "Status", "Started", "Updated"].map((h) => el("th", {}, h)))), body)));
  if (me.role !== "viewer") startForm(startCard); else startCard.remove();
  const load = async () => {
    const q = new URLSearchParams({ limit: "100", status: status.value, path: path.value });
    const r = await api(`/v1/executions?${q}`);
    body.replaceChildren(...r.executions.map((x) =>
      el("tr", { class: "clickable", "data-id": x.execution_id, onclick: () => (location.hash = `#/executions/${encodeURIComponent(x.execution_id)}`) },
        el("td", { class: "mono" }, x.execution_id), el("td", {}, x.path), el("td", {}, badge(x.status)),
        el("td", {}, when(x.created_at)), el("td", {}, ago(x.updated_at)))));
    if (!r.executions.length) body.append(el("tr", {}, el("td", { colspan: 5, class: "muted" }, "No executions match.")));
  };
  status.addEventListener("change", load);
  path.addEventListener("input", load);
  every(2000, () => load().catch(() => {}));
}

async function startForm(card) {
  const cat = await api("/v1/playbooks");
  const latest = new Map();
  for (const p of cat.playbooks) if (!latest.has(p.path) || latest.get(p.path).version < p.version) latest.set(p.path, p);
  const sel = el("select", { id: "start-playbook" }, [...latest.values()].map((p) => el("option", { value: p.path }, `${p.path} (v${p.version})`)));
  const wl = el("textarea", { id: "start-workload", rows: 3, placeholder: '{"name": "you"}' });
  const err = el("p", { class: "error" });
  const go = el("button", { id: "start-button", type: "button" }, "Start execution");
  go.addEventListener("click", async () => {
    err.textContent = "";
    let workload = {};
    try { workload = wl.value.trim() ? JSON.parse(wl.value) : {}; } catch (e) { err.textContent = `workload: ${e.message}`; return; }
    try {
      const r = await api("/v1/executions", { method: "POST", body: { path: sel.value, workload } });
      location.hash = `#/executions/${encodeURIComponent(r.execution_id)}`;
    } catch (e) { err.textContent = `${e.code || "error"}: ${e.message}`; }
  });
  if (!latest.size) { card.append(el("p", { class: "muted" }, "The catalog is empty: register a playbook (mayfly register) to start executions here.")); return; }
  card.append(el("h2", {}, "Start"), el("div", { class: "row" },
    el("div", {}, el("label", { for: "start-playbook" }, "Playbook"), sel),
    el("div", { class: "grow" }, el("label", { for: "start-workload" }, "Workload (JSON, optional)"), wl)), go, err);
}

const KINDS = ["execution.requested", "execution.started", "execution.completed", "execution.failed", "execution.cancelled",
  "command.issued", "command.claimed", "command.completed", "step.started", "step.finished", "step.failed", "step.routed",
  "join.released", "loop.started", "loop.done", "child.requested", "child.started", "step.waiting", "callback.received"];
const TERMINAL = ["execution.completed", "execution.failed", "execution.cancelled"];

// Where the execution stands, folded from its events (the same events the engine folds).
function foldProgress(events) {
  const st = {};  // step -> {state, total, done, failed}
  const s = (n) => (st[n] = st[n] || { state: "", total: null, done: 0, failed: 0 });
  const taken = new Set();
  for (const e of events) {
    if (!e.step) continue;
    const x = s(e.step), idx = e.payload && e.payload.index;
    switch (e.kind) {
      // A step entered again (a back arc) starts over.
      case "command.issued": if (idx === undefined || idx === null) { x.state = "queued"; } else if (x.state === "") x.state = "queued"; break;
      case "command.claimed": case "step.started": if (x.state !== "done" && x.state !== "failed") x.state = "running"; break;
      case "step.waiting": x.state = "waiting"; break;
      case "loop.started": {
        const p = e.payload || {};
        x.total = p.source && p.source.count != null ? p.source.count : (p.items || []).length;
        x.done = 0; x.failed = 0; x.state = "running"; break;
      }
      case "step.finished":
        if (idx !== undefined && idx !== null) x.done += 1; else x.state = "done";
        break;
      case "loop.done": x.state = "done"; break;
      // A failed item fails its loop step (the engine stops it; no loop.done follows).
      case "step.failed": if (idx !== undefined && idx !== null) x.failed += 1; x.state = "failed"; break;
      case "step.routed": {
        const p = e.payload || {};
        for (const t of [...(p.to || []), ...(p.joins || [])]) taken.add(`${e.step}->${t}`);
        break;
      }
    }
  }
  return { steps: st, taken };
}

function drawGraph(g, progress) {
  const W = 170, H = 46, CX = 220, CY = 76, PAD = 20;
  const rows = Math.max(1, ...g.nodes.map((n) => n.order + 1));
  const width = PAD * 2 + Math.max(1, g.ranks) * CX - (CX - W);
  const height = PAD * 2 + rows * CY - (CY - H) + 20;
  const pos = {};
  for (const n of g.nodes) pos[n.name] = { x: PAD + n.rank * CX, y: PAD + 10 + n.order * CY };
  const svg = el("svg", { width, height, viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": "playbook graph" },
    el("defs", {}, el("marker", { id: "arrow", viewBox: "0 0 10 10", refX: 9, refY: 5, markerWidth: 7, markerHeight: 7, orient: "auto-start-reverse" },
      el("path", { d: "M0,0 L10,5 L0,10 z", fill: "#a8b2c4" }))));
  for (const e of g.edges) {
    const a = pos[e.from], b = pos[e.to];
    let d;
    if (e.back || b.x <= a.x) {
      const top = Math.min(a.y, b.y) - 14;
      d = `M${a.x + W / 2},${a.y} C${a.x + W / 2},${top - 30} ${b.x + W / 2},${top - 30} ${b.x + W / 2},${b.y}`;
    } else {
      const x1 = a.x + W, y1 = a.y + H / 2, x2 = b.x, y2 = b.y + H / 2, mx = (x1 + x2) / 2;
      d = `M${x1},${y1} C${mx},${y1} ${mx},${y2} ${x2 - 2},${y2}`;
    }
    const cls = ["gedge", e.back ? "back" : "", progress && progress.taken.has(`${e.from}->${e.to}`) ? "taken" : ""].join(" ");
    svg.append(el("path", { class: cls, d, "marker-end": "url(#arrow)" }, el("title", {}, `${e.from} → ${e.to}${e.when ? ` when ${e.when}` : ""}`)));
  }
  for (const n of g.nodes) {
    const p = pos[n.name], x = progress && progress.steps[n.name];
    const sub = [n.tools.join("+") || "route", n.looping ? `loop ${n.looping}` : ""].filter(Boolean).join(" · ");
    const grp = el("g", { class: `gnode ${x ? x.state : ""}`, "data-step": n.name, "data-state": x ? x.state : "", transform: `translate(${p.x},${p.y})` },
      el("title", {}, `${n.name}${n.desc ? ` — ${n.desc}` : ""} (line ${n.line})`),
      el("rect", { width: W, height: H, rx: 6 }),
      el("text", { x: 10, y: 18 }, n.name.length > 22 ? `${n.name.slice(0, 21)}…` : n.name),
      el("text", { x: 10, y: 34, class: "sub" }, sub));
    if (x && x.total) {
      const frac = Math.min(1, (x.done + x.failed) / x.total);
      grp.append(el("rect", { class: "gbar", x: 0, y: H + 4, width: W, height: 6, rx: 3 }),
        el("rect", { class: "gbar-fill", x: 0, y: H + 4, width: Math.round(W * frac), height: 6, rx: 3 }),
        el("text", { x: W, y: H + 20, class: "sub", "text-anchor": "end", "data-loop": n.name }, `${x.done + x.failed}/${x.total}`));
    }
    svg.append(grp);
  }
  return svg;
}

// JSON rendered with cache references as clickable chips.
function jsonView(v, onRef, indent = "") {
  const frag = document.createDocumentFragment();
  const isRef = (o) => o && typeof o === "object" && typeof o.$ref === "string" && o.$ref.startsWith("sha256:");
  const walk = (o, ind) => {
    if (isRef(o)) {
      frag.append(el("span", { class: "ref", "data-ref": o.$ref, onclick: (ev) => { ev.stopPropagation(); onRef(o); } }, `ref ${o.format || ""} ${o.$ref.slice(0, 19)}…`));
      return;
    }
    if (Array.isArray(o)) {
      if (!o.length) { frag.append("[]"); return; }
      frag.append("[\n");
      o.forEach((x, i) => { frag.append(ind + "  "); walk(x, ind + "  "); frag.append(i < o.length - 1 ? ",\n" : "\n"); });
      frag.append(ind + "]");
    } else if (o && typeof o === "object") {
      const ks = Object.keys(o);
      if (!ks.length) { frag.append("{}"); return; }
      frag.append("{\n");
      ks.forEach((k, i) => { frag.append(`${ind}  ${JSON.stringify(k)}: `); walk(o[k], ind + "  "); frag.append(i < ks.length - 1 ? ",\n" : "\n"); });
      frag.append(ind + "}");
    } else frag.append(JSON.stringify(o));
  };
  walk(v, indent);
  return frag;
}

async function executionPage(id) {
  const view = $("#view");
  const row = await api(`/v1/executions/${encodeURIComponent(id)}`);
  const head = el("div", { class: "card" });
  const graphBox = el("div", { id: "graph" }, el("p", { class: "muted" }, "Loading the playbook graph…"));
  const timeline = el("ol", { id: "timeline" });
  const detail = el("pre", { id: "event-detail" }, "Select an event to open it.");
  const resultBox = el("pre", { id: "result" });
  view.append(head,
    el("div", { class: "grid2" },
      el("div", {}, el("div", { class: "card" }, el("h2", {}, "Playbook"), graphBox),
        el("div", { class: "card" }, el("h2", {}, "Result"), resultBox)),
      el("div", {}, el("div", { class: "card" }, el("h2", {}, "Events ", el("span", { id: "event-count", class: "muted" })), timeline),
        el("div", { class: "card" }, el("h2", {}, "Event"), detail))));
  const events = [];
  let graph = null;
  const renderHead = (r) => {
    const cancel = me.role !== "viewer" && !["completed", "failed", "cancelled"].includes(r.status)
      ? el("button", { class: "danger", type: "button", onclick: async () => { try { await api(`/v1/executions/${encodeURIComponent(id)}/cancel`, { method: "POST" }); } catch (e) { head.append(errorBox(e)); } } }, "Cancel") : null;
    head.replaceChildren(el("h1", {}, "Execution ", el("span", { class: "mono" }, id)),
      el("div", { class: "row" }, el("div", {}, el("label", {}, "Playbook"), r.path), el("div", {}, el("label", {}, "Status"), el("span", { id: "exec-status" }, badge(r.status))),
        el("div", {}, el("label", {}, "Events"), el("span", { id: "exec-events" }, String(Math.max(r.events, events.length)))), r.failed_step ? el("div", {}, el("label", {}, "Failed step"), r.failed_step) : null), cancel || "");
    resultBox.replaceChildren(r.error ? `error: ${JSON.stringify(r.error, null, 2)}` : jsonView(r.result, openRef));
  };
  const openRef = (ref) => {
    detail.replaceChildren(`cache reference ${ref.$ref}\n\n`, JSON.stringify(ref, null, 2),
      "\n\nThe bytes stay in the shared cache, behind the compute boundary: the gateway never reads\ndomain data. A step of a playbook reads them (e.g. the next block hydrates this ref).");
  };
  const redraw = () => { if (graph) graphBox.replaceChildren(drawGraph(graph, foldProgress(events))); };
  renderHead(row);
  // The graph of the exact catalog version that ran (by content digest).
  api("/v1/playbooks").then(async (cat) => {
    const first = await api(`/v1/executions/${encodeURIComponent(id)}/events?from=1&limit=1`);
    const digest = first.events.length ? first.events[0].playbook_digest : null;
    const entry = cat.playbooks.find((p) => p.path === row.path && p.digest === digest);
    if (!entry) { graphBox.replaceChildren(el("p", { class: "muted" }, "This playbook version is not in the catalog (started from a file): no graph.")); return; }
    const g = await api(`/v1/catalog/graph?${new URLSearchParams({ path: entry.path, version: entry.version })}`);
    graph = g.graph; redraw();
  }).catch((e) => graphBox.replaceChildren(errorBox(e)));
  let selected = null;
  const addEvent = (e) => {
    events.push(e);
    const cls = TERMINAL.includes(e.kind) || e.kind === "step.failed" ? (e.kind === "execution.completed" ? "good" : "bad") : "";
    const li = el("li", { "data-seq": e.seq, "data-kind": e.kind },
      el("span", { class: "seq" }, e.seq), el("span", { class: `kind ${cls}` }, e.kind),
      el("span", {}, e.step || ""), e.payload && e.payload.index != null ? el("span", { class: "muted" }, `#${e.payload.index}`) : null,
      el("span", { class: "muted right" }, new Date(e.at).toLocaleTimeString()));
    li.addEventListener("click", () => {
      if (selected) selected.classList.remove("sel");
      selected = li; li.classList.add("sel");
      detail.replaceChildren(jsonView(e, openRef));
    });
    timeline.append(li);
    $("#event-count").textContent = `(${events.length})`;
    const n = $("#exec-events");
    if (n) n.textContent = String(events.length);
  };
  // Live: the gateway's SSE stream (resumable: the browser resends Last-Event-ID).
  const es = new EventSource(`/v1/executions/${encodeURIComponent(id)}/stream`);
  cleanup.push(() => es.close());
  let pending = null;
  const onEvent = (m) => {
    const e = JSON.parse(m.data);
    if (events.length && e.seq <= events[events.length - 1].seq) return;
    addEvent(e);
    if (!pending) pending = setTimeout(() => { pending = null; redraw(); }, 100);
    // The status badge follows the events; the result comes with a fetch at the end.
    const s = $("#exec-status");
    if (TERMINAL.includes(e.kind)) {
      es.close();
      if (s) s.replaceChildren(badge(e.kind.slice("execution.".length)));
      api(`/v1/executions/${encodeURIComponent(id)}`).then(renderHead).catch(() => {});
      setTimeout(redraw, 0);
    } else if (s && s.textContent === "pending" && e.kind === "execution.started") {
      s.replaceChildren(badge("running"));
    }
  };
  for (const k of KINDS) es.addEventListener(k, onEvent);
  // A refused stream (say, the session expired) is not retried by the browser: find out why.
  es.onerror = () => { if (es.readyState === EventSource.CLOSED) api("/v1/whoami").catch(() => {}); };
}

// ---------- catalog ----------

async function catalogPage() {
  const cat = await api("/v1/playbooks");
  const by = new Map();
  for (const p of cat.playbooks) { if (!by.has(p.path)) by.set(p.path, []); by.get(p.path).push(p); }
  $("#view").append(el("h1", {}, "Catalog"), el("div", { class: "card" },
    el("table", {}, el("thead", {}, el("tr", {}, ["Playbook", "Versions", "Latest", "Digest", "Registered"].map((h) => el("th", {}, h)))),
      el("tbody", { id: "catalog" }, [...by.entries()].map(([path, vs]) => {
        vs.sort((a, b) => b.version - a.version);
        const l = vs[0];
        return el("tr", { class: "clickable", "data-path": path, onclick: () => (location.hash = `#/catalog/${encodeURIComponent(path)}`) },
          el("td", {}, path), el("td", {}, vs.length), el("td", {}, `v${l.version}`), el("td", { class: "mono" }, l.digest.slice(0, 19)), el("td", {}, when(l.created_at)));
      }))),
    by.size ? null : el("p", { class: "muted" }, "No playbooks yet: mayfly register FILE.yaml")));
}

async function playbookPage(path) {
  const cat = await api("/v1/playbooks");
  const vs = cat.playbooks.filter((p) => p.path === path).sort((a, b) => b.version - a.version);
  if (!vs.length) throw new Error(`no playbook ${path}`);
  const opt = (sel) => vs.map((v) => el("option", { value: v.version, selected: v.version === sel || undefined }, `v${v.version} · ${v.digest.slice(7, 19)}`));
  const version = el("select", { id: "pb-version" }, opt(vs[0].version));
  const from = el("select", { id: "diff-from" }, opt(vs.length > 1 ? vs[1].version : vs[0].version));
  const to = el("select", { id: "diff-to" }, opt(vs[0].version));
  const graphBox = el("div", { id: "graph" });
  const source = el("pre", { id: "pb-source" });
  const diffBox = el("pre", { id: "diff", class: "diff" });
  $("#view").append(el("h1", {}, path),
    el("div", { class: "card" }, el("div", { class: "row" }, el("div", {}, el("label", {}, "Version"), version)), el("h2", {}, "Graph"), graphBox, el("h2", {}, "Source"), source),
    el("div", { class: "card" }, el("h2", {}, "Diff"), el("div", { class: "row" }, el("div", {}, el("label", {}, "From"), from), el("div", {}, el("label", {}, "To"), to)), el("br"), diffBox));
  const show = async () => {
    const [pb, g] = await Promise.all([
      api(`/v1/playbooks/${path.split("/").map(encodeURIComponent).join("/")}?version=${version.value}`),
      api(`/v1/catalog/graph?${new URLSearchParams({ path, version: version.value })}`)]);
    source.textContent = pb.content;
    graphBox.replaceChildren(drawGraph(g.graph, null));
  };
  const diff = async () => {
    const d = await api(`/v1/catalog/diff?${new URLSearchParams({ path, from: from.value, to: to.value })}`);
    diffBox.replaceChildren(el("span", { class: "muted" }, `+${d.added} −${d.removed}\n`),
      ...(d.unified || "(identical)\n").split("\n").map((l) => el("span", { class: l.startsWith("@@") ? "hunk" : l.startsWith("+") ? "add" : l.startsWith("-") ? "del" : "" }, `${l}\n`)));
  };
  version.addEventListener("change", () => show().catch((e) => graphBox.replaceChildren(errorBox(e))));
  from.addEventListener("change", () => diff().catch(() => {}));
  to.addEventListener("change", () => diff().catch(() => {}));
  await Promise.all([show(), diff()]);
}

// ---------- keychain, workers, rollouts, actors ----------

async function keychainPage() {
  const r = await api("/v1/keychain");
  $("#view").append(el("h1", {}, "Keychain"), el("div", { class: "card" },
    el("p", { class: "muted" }, "Aliases only: values are sealed in the store and resolved inside workers, never shown. Set them with mayfly keychain set."),
    el("table", {}, el("thead", {}, el("tr", {}, el("th", {}, "Alias"), el("th", {}, "Last set"))),
      el("tbody", { id: "aliases" }, r.aliases.map((a) => el("tr", {}, el("td", { class: "mono" }, a.alias), el("td", {}, when(a.updated_at)))))),
    r.aliases.length ? null : el("p", { class: "muted" }, "No credentials in this tenant's keychain.")));
}

async function workersPage() {
  const stats = el("div", { class: "stats", id: "queue" });
  const agents = el("tbody", { id: "agents" });
  $("#view").append(el("h1", {}, "Workers and queue"), stats, el("div", { class: "card" }, el("h2", {}, "Worker agents"),
    el("table", {}, el("thead", {}, el("tr", {}, ["Agent", "Pool", "Labels", "Bundle", "Blocks ok / failed", "Last seen", ""].map((h) => el("th", {}, h)))), agents)));
  const stat = (n, l, id) => el("div", { class: "stat" }, el("div", { class: "n", id }, n), el("div", { class: "l" }, l));
  every(2000, async () => {
    const r = await api("/v1/workers");
    const q = r.queue;
    stats.replaceChildren(...(q ? [
      stat(q.up ? "up" : "down", "queue", "q-up"), stat(q.stats.depth, "blocks waiting (depth)", "q-depth"),
      stat(q.stats.blocks_in_flight, "blocks in flight", "q-inflight"), stat(q.stats.consumer_lag ?? "—", "JetStream consumer lag", "q-lag"),
      stat(q.stats.live_executions, "live executions", "q-live"), stat(q.pending_publishes, "pending publishes", "q-pending")]
      : [el("p", { class: "muted" }, "This node is a read replica: it runs no queue.")]));
    if (r.agents === null) { agents.replaceChildren(el("tr", {}, el("td", { colspan: 7, class: "muted" }, "Worker agents are shared infrastructure: visible to the system tenant."))); return; }
    agents.replaceChildren(...r.agents.map((a) => el("tr", {}, el("td", { class: "mono" }, a.agent), el("td", {}, a.pool),
      el("td", { class: "mono" }, Object.entries(a.labels || {}).map(([k, v]) => `${k}=${v}`).join(" ")),
      el("td", { class: "mono" }, a.applied ? a.applied.slice(0, 19) : "none", a.refused ? el("div", { class: "error" }, `refused: ${a.refused.code}`) : null),
      el("td", {}, `${a.blocks_ok} / ${a.blocks_failed}`), el("td", {}, ago(a.last_seen_ms)), el("td", {}, badge(a.live ? "live" : "lost")))));
    if (!r.agents.length) agents.append(el("tr", {}, el("td", { colspan: 7, class: "muted" }, "No worker agent has reported (embedded workers run in this process).")));
  });
}

async function rolloutsPage() {
  const view = $("#view");
  view.append(el("h1", {}, "Rollouts"));
  const r = await api("/v1/objects/Rollout");
  if (!r.objects.length) { view.append(el("div", { class: "card" }, el("p", { class: "muted" }, "No rollouts. Apply a Rollout object (see the README's control plane section)."))); return; }
  for (const o of r.objects) {
    const name = (o.key && o.key.name) || o.name;
    const card = el("div", { class: "card", "data-rollout": name }, el("h2", {}, name));
    view.append(card);
    if (!me.system) { card.append(el("pre", {}, JSON.stringify(o, null, 2))); continue; }
    const s = await api(`/v1/rollouts/${encodeURIComponent(name)}`).catch((e) => ({ error: e }));
    if (s.error) { card.append(errorBox(s.error)); continue; }
    card.append(el("p", {}, "Phase ", badge(String(s.transition.phase)), " ", el("span", { class: "muted" }, s.transition.reason)),
      el("table", {}, el("thead", {}, el("tr", {}, ["Agent", "Pool", "Acknowledged bundle", "Effective", "Live", "Last seen"].map((h) => el("th", {}, h)))),
        el("tbody", {}, s.agents.map((a) => el("tr", {}, el("td", { class: "mono" }, a.agent), el("td", {}, a.pool),
          el("td", { class: "mono" }, a.applied ? a.applied.slice(0, 19) : "none", a.refused ? el("div", { class: "error" }, a.refused.code) : null),
          el("td", {}, badge(a.effective ? "ok" : "pending")), el("td", {}, badge(a.live ? "live" : "lost")), el("td", {}, ago(a.last_seen_ms)))))));
  }
}

async function actorsPage() {
  const view = $("#view");
  view.append(el("h1", {}, "Actors"));
  let r;
  try { r = await api("/v1/actors"); } catch (e) {
    if (e.code === "dataplane_disabled") { view.append(el("div", { class: "card" }, el("p", { class: "muted" }, "The actor dataplane is off on this server (mayfly server --provider-listen ADDR turns it on)."))); return; }
    throw e;
  }
  // Declared actors that never ran have no dataplane record yet: list them from their objects.
  const objs = await api("/v1/objects/Actor").catch(() => ({ objects: [] }));
  const seen = new Set(r.actors.map((a) => `${a.tenant}/${a.name}`));
  for (const o of objs.objects || []) {
    const k = o.key || {};
    if (seen.has(`${k.tenant}/${k.name}`)) continue;
    const cond = ((o.status || {}).conditions || [])[0] || {};
    r.actors.push({ name: k.name, tenant: k.tenant, template: (o.spec || {}).template, phase: cond.reason || "Declared", epoch: 0, reason: cond.message || "never run" });
  }
  const snaps = el("pre", { id: "snapshots" }, "Select an actor to list its snapshots.");
  view.append(el("div", { class: "card" }, el("table", {}, el("thead", {}, el("tr", {}, ["Actor", "Tenant", "Template", "Phase", "Epoch", "Worker", "Last snapshot", "Reason"].map((h) => el("th", {}, h)))),
    el("tbody", { id: "actors" }, r.actors.map((a) => el("tr", { class: "clickable", "data-actor": a.name, onclick: async () => {
      const s = await api(`/v1/actors/${encodeURIComponent(a.name)}/snapshots`).catch((e) => ({ error: e }));
      snaps.textContent = s.error ? s.error.message : JSON.stringify(s.snapshots, null, 2);
    } }, el("td", {}, a.name), el("td", {}, a.tenant), el("td", {}, a.template), el("td", {}, badge(a.phase)), el("td", {}, a.epoch),
      el("td", { class: "mono" }, a.worker || "—"), el("td", { class: "mono" }, a.snapshot ? a.snapshot.slice(0, 19) : "—"), el("td", { class: "muted" }, a.reason))))),
    r.actors.length ? null : el("p", { class: "muted" }, "No actors.")), el("div", { class: "card" }, el("h2", {}, "Snapshots"), snaps));
}

window.addEventListener("hashchange", route);
document.addEventListener("DOMContentLoaded", () => {
  $("#login-form").addEventListener("submit", login);
  $("#logout").addEventListener("click", logout);
  start();
});
