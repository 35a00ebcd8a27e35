// vmha's web page: reads GET /v1/status (every 2 s and after each event), follows
// GET /v1/events/stream (server-sent events, read with fetch so that the token goes in the
// Authorization header, never in a URL), and sends admin commands to POST /v1/commands after a
// confirmation. The token is kept in sessionStorage only: this tab, until it closes.
// Everything from the API is put in the page with textContent, never as HTML.
"use strict";

const TOKEN_KEY = "vmha-token";
const MAX_EVENTS = 200;
let status = null;
let statusAsked = 0;
let statusShown = 0;
let explained = null;
let refreshTimer = null;
let streamAbort = null;

const $ = (id) => document.getElementById(id);

function token() {
  return sessionStorage.getItem(TOKEN_KEY);
}

function headers(extra) {
  const h = Object.assign({}, extra || {});
  const t = token();
  if (t) h.Authorization = "Bearer " + t;
  return h;
}

/** An element with classes and text (or children). */
function el(tag, cls, content) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (Array.isArray(content)) content.forEach((c) => c && e.append(c));
  else if (content !== undefined && content !== null) e.textContent = String(content);
  return e;
}

function badge(state) {
  const s = state || "unknown";
  const b = el("span", "badge " + s.replace(/[^a-z-]/g, ""), s);
  b.dataset.state = s;
  return b;
}

function notice(text, isError) {
  const n = $("notice");
  n.textContent = text;
  n.className = isError ? "error" : "ok";
  n.hidden = false;
  clearTimeout(notice.timer);
  notice.timer = setTimeout(() => { n.hidden = true; }, isError ? 10000 : 4000);
}

function window_ms(ms) {
  if (ms % 3600000 === 0) return ms / 3600000 + " h";
  if (ms % 60000 === 0) return ms / 60000 + " min";
  return ms / 1000 + " s";
}

async function api(method, path, body) {
  const init = { method, headers: headers(body ? { "Content-Type": "application/json" } : {}) };
  if (body) init.body = JSON.stringify(body);
  const r = await fetch(path, init);
  const text = await r.text();
  let json = null;
  try { json = JSON.parse(text); } catch (_) { /* not JSON */ }
  if (r.status === 401) needToken(json && json.error);
  if (!r.ok) {
    const why = json && json.error ? json.error : r.status + " " + r.statusText;
    throw new Error(why);
  }
  return json;
}

function needToken(why) {
  const hadOne = token() !== null;
  sessionStorage.removeItem(TOKEN_KEY);
  if (streamAbort) streamAbort.abort();
  $("main").hidden = true;
  $("forget").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = why && hadOne ? why : "";
  $("token").focus();
}

// ---- status -------------------------------------------------------------------------------

async function refresh() {
  clearTimeout(refreshTimer);
  const mine = ++statusAsked;
  try {
    const fresh = await api("GET", "/v1/status");
    // Answers may arrive out of order: never show an older one over a newer one.
    if (mine < statusShown) return;
    statusShown = mine;
    status = fresh;
    render();
    $("main").hidden = false;
    $("login").hidden = true;
    $("forget").hidden = !token();
    if (!streamAbort) follow();
  } catch (e) {
    if (!$("login").hidden) return; // asking for a token: no polling meanwhile
    notice("status: " + e.message, true);
  }
  refreshTimer = setTimeout(refresh, 2000);
}

/** Refresh soon (events come in bursts). */
function refreshSoon() {
  clearTimeout(refreshTimer);
  refreshTimer = setTimeout(refresh, 150);
}

function render() {
  $("cluster").textContent = status.cluster;
  const role = status.controller ? "controller" : "leader: " + (status.leader || "none");
  $("whoami").textContent = "host " + status.host + " (" + status.host_state + ", " + role + ")";
  renderHosts();
  renderVms();
  if (explained) explain(explained, true);
}

function renderHosts() {
  const body = $("hosts").tBodies[0];
  body.replaceChildren();
  const view = status.cluster_view;
  const hosts = view ? view.hosts : [{ name: status.host, state: status.host_state, used_mb: null }];
  for (const h of hosts) {
    const mem = h.capacity_mb ? h.used_mb + " / " + h.capacity_mb + " MiB" : (h.used_mb != null ? h.used_mb + " MiB" : "");
    const inMaint = h.state === "maintenance";
    const act = button(inMaint ? "end maintenance" : "maintenance",
      { command: "host-maintenance", host: h.name, on: !inMaint },
      inMaint ? "End maintenance of host " + h.name + "?" :
        "Put host " + h.name + " in maintenance? Its VM groups are moved or stopped.");
    const tr = el("tr", null, [el("td", "name", h.name), el("td", null, [badge(h.state)]), el("td", null, mem), el("td", null, [act])]);
    tr.dataset.host = h.name;
    body.append(tr);
  }
}

function hostNames() {
  return status.cluster_view ? status.cluster_view.hosts.map((h) => h.name) : [status.host];
}

function renderVms() {
  const box = $("vms");
  box.replaceChildren();
  const cluster = {};
  if (status.cluster_view) for (const v of status.cluster_view.vms) cluster[v.name] = v;
  if (status.agent.vms.length === 0) box.append(el("p", "muted", "no VM group on this host"));
  for (const vm of status.agent.vms) {
    const card = el("article", "vm");
    card.dataset.vm = vm.name;
    card.dataset.state = vm.state;
    const flags = [];
    if (vm.frozen) flags.push(el("span", "flag", "frozen"));
    if (vm.paused) flags.push(el("span", "flag", "paused"));
    if (vm.qemu_unresponsive) flags.push(el("span", "flag warn", "QEMU not answering"));
    if (vm.guest_channel_up === false) flags.push(el("span", "flag warn", "guest channel down"));
    card.append(el("h3", null, [el("span", "name", vm.name), badge(vm.state), ...flags]));
    const budget = vm.vm_restarts_in_window + " / " + vm.vm_restart_limit + " in " + window_ms(vm.vm_restart_window_ms);
    const facts = [
      ["owner", vm.owner || "none"], ["desired", vm.desired || "?"],
      ["VM restarts", budget], ["policy", vm.policy + " (tie: " + vm.tie + ")"],
    ];
    if (vm.plan) facts.push(["plan", vm.plan]);
    if (vm.fault) facts.push(["fault", vm.fault]);
    const c = cluster[vm.name];
    if (c && c.note) facts.push(["controller", c.note]);
    const dl = el("dl");
    for (const [k, v] of facts) dl.append(el("dt", null, k), el("dd", k === "fault" ? "error" : null, v));
    card.append(dl);
    card.append(appsTable(vm));
    const n = vm.name;
    card.append(el("div", "actions", [
      explainButton(n),
      button("start", { command: "vm-start", vm: n }, "Start VM group " + n + "?"),
      button("restart", { command: "vm-restart", vm: n }, "Restart VM " + n + "? Its apps are stopped and started again."),
      button("stop", { command: "vm-stop", vm: n }, "Stop VM group " + n + "? Its apps are stopped and the VM shut down."),
      moveButton(vm),
      vm.frozen ? button("unfreeze", { command: "unfreeze", vm: n }, "Unfreeze " + n + "? vmha acts on it again.")
        : button("freeze", { command: "freeze", vm: n }, "Freeze " + n + "? vmha keeps monitoring it but takes no action."),
      button("clear", { command: "clear", vm: n }, "Clear the faults of " + n + "? Faulted apps are re-armed and budgets reset."),
    ]));
    box.append(card);
  }
}

function appsTable(vm) {
  const t = el("table", "apps");
  t.append(el("thead", null, [el("tr", null, ["app", "state", "priority", "restarts", "why", ""].map((h) => el("th", null, h)))]));
  const body = el("tbody");
  for (const a of vm.apps) {
    const name = vm.name + "/" + a.name;
    const stateCell = el("td", null, [badge(a.state)]);
    if (a.offline) stateCell.append(el("span", "flag", a.offline.auto_clear ? "offline (auto-clear)" : "offline"));
    const restarts = el("td", a.restarts_in_window >= a.restart_limit ? "error" : null,
      a.restarts_in_window + " / " + a.restart_limit + " in " + window_ms(a.restart_window_ms));
    const acts = el("td", "actions", [
      button("start", { command: "app-start", vm: vm.name, app: a.name }, "Start " + name + "?"),
      button("stop", { command: "app-stop", vm: vm.name, app: a.name }, "Stop " + name + "? It is marked offline."),
      a.offline ? button("online", { command: "app-online", vm: vm.name, app: a.name }, "Clear the offline flag of " + name + "? It is monitored and restarted again.")
        : button("offline", { command: "app-offline", vm: vm.name, app: a.name, auto_clear: true }, "Mark " + name + " offline? vmha stops restarting it until it runs again."),
    ]);
    const tr = el("tr", null, [el("td", "name", a.name + (a.critical ? " ★" : "")), stateCell,
      el("td", null, a.priority), restarts, el("td", "reason", a.reason), acts]);
    tr.dataset.app = name;
    tr.dataset.state = a.state;
    body.append(tr);
  }
  t.append(body);
  const wrap = el("div", "scroll", [t]);
  return wrap;
}

// ---- actions ------------------------------------------------------------------------------

/** A button that sends `command` after the operator confirms `question`. */
function button(label, command, question) {
  const b = el("button", "act", label);
  b.type = "button";
  b.dataset.action = command.command + (command.on === false ? "-off" : "");
  if (command.vm) b.dataset.vm = command.vm;
  if (command.app) b.dataset.app = command.app;
  if (command.host) b.dataset.host = command.host;
  b.addEventListener("click", () => confirmThen(question, null, () => send(command)));
  return b;
}

function moveButton(vm) {
  const targets = hostNames().filter((h) => h !== vm.owner);
  const b = el("button", "act", "move");
  b.type = "button";
  b.dataset.action = "vm-move";
  b.dataset.vm = vm.name;
  b.disabled = targets.length === 0;
  b.addEventListener("click", () => confirmThen("Move VM group " + vm.name + "?", targets,
    (to) => send({ command: "vm-move", vm: vm.name, to })));
  return b;
}

function confirmThen(question, hosts, then) {
  $("confirm-text").textContent = question;
  const extra = $("confirm-extra");
  extra.hidden = !hosts;
  const sel = $("confirm-host");
  sel.replaceChildren(...(hosts || []).map((h) => el("option", null, h)));
  const dlg = $("confirm");
  dlg.hidden = false;
  const close = () => { dlg.hidden = true; $("confirm-yes").onclick = null; };
  $("confirm-no").onclick = close;
  $("confirm-yes").onclick = () => { close(); then(sel.value); };
  $("confirm-yes").focus();
}

async function send(command) {
  try {
    await api("POST", "/v1/commands", command);
    notice(command.command + ": done");
  } catch (e) {
    notice(command.command + " refused: " + e.message, true);
  }
  refreshSoon();
}

// ---- explain ------------------------------------------------------------------------------

function explainButton(vm) {
  const b = el("button", "act", "explain");
  b.type = "button";
  b.dataset.action = "explain";
  b.dataset.vm = vm;
  b.addEventListener("click", () => explain(vm, false));
  return b;
}

async function explain(vm, quiet) {
  explained = vm;
  let x;
  try {
    x = await api("GET", "/v1/vms/" + encodeURIComponent(vm) + "/explain");
  } catch (e) {
    if (!quiet) notice("explain " + vm + ": " + e.message, true);
    return;
  }
  $("explain-vm").textContent = vm;
  const box = $("explain");
  box.replaceChildren();
  box.append(el("h3", null, "Decisions (oldest first)"));
  const decisions = el("ol", "decisions");
  for (const d of x.vm.decisions) {
    decisions.append(el("li", null, [el("time", null, new Date(d.time).toLocaleTimeString()), " ", el("strong", null, d.verdict), ": ", el("span", "reason", d.reason)]));
  }
  if (x.vm.decisions.length === 0) decisions.append(el("li", "muted", "no decision yet"));
  box.append(decisions);
  if (x.cluster) {
    box.append(el("h3", null, "Controller"));
    box.append(el("p", null, "state " + x.cluster.state + (x.cluster.note ? ": " + x.cluster.note : "") +
      (x.cluster.faulted_on.length ? "; faulted on " + x.cluster.faulted_on.map((f) => f[0]).join(", ") : "")));
  }
  box.append(el("h3", null, "Recent events"));
  const evs = el("ol", "explain-events");
  for (const e of x.events) evs.append(el("li", null, eventText(e)));
  box.append(evs);
  $("explain-section").hidden = false;
  if (!quiet) $("explain-section").scrollIntoView({ behavior: "smooth" });
}

// ---- events -------------------------------------------------------------------------------

function objectName(o) {
  if (o.host) return "host:" + o.host;
  if (o.vm) return o.vm;
  if (o.app) return o.app.vm + "/" + o.app.app;
  return "?";
}

function eventText(e) {
  const origin = typeof e.origin === "string" ? e.origin : e.origin.host;
  return new Date(e.time).toLocaleTimeString() + " " + origin + " " + objectName(e.object) +
    " " + e.from + " → " + e.to + ": " + e.reason;
}

function addEvent(line) {
  const li = el("li", null, [badge(line.to), " ", el("span", "text", eventText(line))]);
  li.dataset.object = objectName(line.object);
  li.dataset.to = line.to;
  const list = $("events");
  list.prepend(li);
  while (list.children.length > MAX_EVENTS) list.lastChild.remove();
}

function setLink(state) {
  const l = $("link");
  l.textContent = state === "online" ? "live" : state === "offline" ? "reconnecting" : "connecting";
  l.className = "badge " + state;
}

/** Follows the event stream; reconnects (after 2 s) when it ends. */
async function follow() {
  const abort = new AbortController();
  streamAbort = abort;
  try {
    const r = await fetch("/v1/events/stream?limit=50", { headers: headers(), signal: abort.signal });
    if (r.status === 401) { needToken(); return; }
    if (!r.ok || !r.body) throw new Error(r.status + " " + r.statusText);
    $("events").replaceChildren();
    setLink("online");
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true });
      let end;
      while ((end = buf.indexOf("\n\n")) >= 0) {
        const block = buf.slice(0, end);
        buf = buf.slice(end + 2);
        const data = block.split("\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("\n");
        if (!data) continue;
        try { addEvent(JSON.parse(data)); } catch (_) { continue; }
        refreshSoon();
      }
    }
  } catch (e) {
    if (abort.signal.aborted) return;
  }
  if (streamAbort !== abort) return;
  streamAbort = null;
  setLink("offline");
  setTimeout(() => { if (!streamAbort && $("login").hidden) follow(); }, 2000);
}

// ---- start --------------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  $("login").addEventListener("submit", (ev) => {
    ev.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, $("token").value.trim());
    $("token").value = "";
    refresh();
  });
  $("forget").addEventListener("click", () => needToken());
  $("explain-close").addEventListener("click", () => { explained = null; $("explain-section").hidden = true; });
  document.addEventListener("keydown", (ev) => { if (ev.key === "Escape") $("confirm").hidden = true; });
  refresh();
});
