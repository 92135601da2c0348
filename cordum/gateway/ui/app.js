// Cordum dashboard: a single page over the gateway's JSON API. No framework, no build step.
// Everything shown comes from the API and is put into the page as text (never as HTML).
"use strict";

const API = "/api/v1";
const SESSION = "cordum.session";
const POLL_MS = 5000; // without the live stream, the current view is re-read this often
const JOB_STATES = ["", "PENDING", "APPROVAL_REQUIRED", "SCHEDULED", "DISPATCHED", "RUNNING", "RETRYING",
  "SUCCEEDED", "FAILED", "CANCELLED", "DENIED", "TIMEOUT", "OUTPUT_QUARANTINED"];
const RANK = { viewer: 0, operator: 1, admin: 2 };

let session = null; // {key, tenant, role, principal}
let socket = null;
let pollTimer = null;
let refreshTimer = null;
let rendering = false;
let renderAgain = false; // something asked for a render while one ran

// ---- small DOM helpers ----------------------------------------------------------------------

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (name === "class") node.className = value;
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

const $ = (id) => document.getElementById(id);
const can = (role) => session && RANK[session.role] >= RANK[role];
const fmtTime = (value, precise) => {
  if (value === undefined || value === null || value === "") return "";
  const date = typeof value === "number" ? new Date(value > 1e14 ? value / 1000 : value > 1e11 ? value : value * 1000) : new Date(value);
  if (isNaN(date)) return String(value);
  // A job's steps are milliseconds apart: its timeline shows them.
  return precise ? `${date.toLocaleString()}.${String(date.getMilliseconds()).padStart(3, "0")}` : date.toLocaleString();
};
const stateCell = (state) => el("td", { class: `state ${state}` }, state);

function table(headers, rows, empty) {
  if (!rows.length) return el("p", { class: "muted" }, empty || "Nothing here.");
  return el("table", {}, el("thead", {}, el("tr", {}, headers.map((h) => el("th", {}, h)))), el("tbody", {}, rows));
}

let renderFailed = false; // the error on screen came from reading a view: the next good read clears it

function showError(message) {
  renderFailed = false;
  const box = $("error");
  box.textContent = message || "";
  box.hidden = !message;
}

// ---- the API --------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

// An OIDC token (a JWT: three base64url parts) goes as a bearer token; anything else is an API key.
const isToken = (credential) => /^ey[\w-]+\.[\w-]+\.[\w-]*$/.test(credential);

async function api(method, path, body) {
  const headers = { Accept: "application/json" };
  if (isToken(session.key)) headers.Authorization = `Bearer ${session.key}`;
  else headers["X-API-Key"] = session.key;
  if (session.tenant) headers["X-Tenant-ID"] = session.tenant;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(API + path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body), cache: "no-store" });
  if (response.status === 204) return null;
  const text = await response.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (_) { data = text; }
  if (!response.ok) {
    const message = (data && (data.error || data.message)) || `${response.status} ${response.statusText}`;
    if (response.status === 401) signOut(`Signed out: ${message}`);
    throw new ApiError(response.status, `${method} ${path}: ${message}`);
  }
  return data;
}

async function act(label, fn) {
  showError("");
  try {
    await fn();
    await render();
  } catch (err) {
    showError(`${label} failed: ${err.message}`);
  }
}

// ---- sign in / out --------------------------------------------------------------------------

async function signIn(key, tenant) {
  session = { key, tenant };
  try {
    const status = await api("GET", "/status");
    const caller = status.caller || {};
    session.role = caller.role || "viewer";
    session.principal = caller.principal_id || "";
    session.tenant = tenant || caller.tenant || "";
    sessionStorage.setItem(SESSION, JSON.stringify(session));
    return true;
  } catch (err) {
    session = null;
    showError(`Sign-in failed: ${err.message}`);
    return false;
  }
}

function signOut(message) {
  session = null;
  sessionStorage.removeItem(SESSION);
  stopLive();
  // The next user of this tab sees nothing the last one typed or chose.
  for (const name of Object.keys(drafts)) delete drafts[name];
  filters.state = "";
  filters.topic = "";
  showError(message || "");
  layout();
}

function layout() {
  const signedIn = !!session;
  $("signin").hidden = signedIn;
  $("nav").hidden = !signedIn;
  $("signout").hidden = !signedIn;
  $("who").textContent = signedIn ? `${session.tenant} · ${session.role}${session.principal ? " · " + session.principal : ""}` : "";
  if (!signedIn) $("view").replaceChildren();
}

// ---- live updates: the WebSocket stream, else polling ---------------------------------------

function base64url(text) {
  const bytes = new TextEncoder().encode(text);
  let binary = "";
  for (const b of bytes) binary += String.fromCharCode(b);
  return btoa(binary).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

function setLive(on) {
  const badge = $("live");
  badge.textContent = on ? "live" : "polling";
  badge.className = `live ${on ? "on" : "off"}`;
}

const RECONNECT_MS = [3000, 6000, 12000, 30000]; // the stream's reconnect delays, then the last one
let reconnects = 0;
let reconnectTimer = null;

function startLive() {
  stopLive();
  // Polling runs all along: it carries the views while the stream is down, and replicas and
  // leases (the cluster view) change without a stream event.
  pollTimer = setInterval(() => {
    if (!socket || socket.readyState !== WebSocket.OPEN || currentView() === "cluster") autoRefresh();
  }, POLL_MS);
  openStream();
}

function openStream() {
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  let ws;
  try {
    ws = new WebSocket(`${scheme}://${location.host}${API}/stream`, ["cordum-api-key", base64url(session.key)]);
  } catch (_) {
    setLive(false);
    return;
  }
  socket = ws;
  ws.onopen = () => {
    reconnects = 0;
    setLive(true);
    scheduleRefresh(); // what happened while it was down
  };
  ws.onmessage = (event) => {
    let packet = null;
    try { packet = JSON.parse(event.data); } catch (_) { return; }
    if (packet && packet.heartbeat && currentView() !== "workers") return; // frequent, and only the workers view shows them
    scheduleRefresh();
  };
  ws.onclose = () => {
    setLive(false);
    if (socket !== ws || !session) return; // signed out, or replaced
    // Back off: a stream refused (a proxy without WebSocket, a key just rotated) is not retried
    // in a tight loop; each refusal counts against this address's failed authentications.
    const delay = RECONNECT_MS[Math.min(reconnects, RECONNECT_MS.length - 1)];
    reconnects += 1;
    reconnectTimer = setTimeout(() => { reconnectTimer = null; if (socket === ws && session) openStream(); }, delay);
  };
}

function stopLive() {
  if (pollTimer) clearInterval(pollTimer);
  pollTimer = null;
  if (reconnectTimer) clearTimeout(reconnectTimer);
  reconnectTimer = null;
  reconnects = 0;
  const ws = socket;
  socket = null;
  if (ws) ws.close();
  setLive(false);
}

function typing() {
  // A refresh rebuilds the view: not while someone types into it.
  const active = document.activeElement;
  return !!active && $("view").contains(active) && ["INPUT", "TEXTAREA", "SELECT"].includes(active.tagName);
}

function autoRefresh() {
  if (typing()) scheduleRefresh();
  else render();
}

function scheduleRefresh() {
  // Events come in bursts: re-read the view at most every 300 ms.
  if (refreshTimer) return;
  refreshTimer = setTimeout(() => { refreshTimer = null; autoRefresh(); }, 300);
}

// ---- views ----------------------------------------------------------------------------------

function currentView() {
  const parts = location.hash.replace(/^#\/?/, "").split("/");
  return parts[0] || "jobs";
}

function routeArg() {
  const parts = location.hash.replace(/^#\/?/, "").split("/");
  return parts.length > 1 ? decodeURIComponent(parts.slice(1).join("/")) : "";
}

const views = {
  jobs: async (arg) => (arg ? jobDetail(arg) : jobsView()),
  approvals: async () => approvalsView(),
  dlq: async () => dlqView(),
  workers: async () => workersView(),
  runs: async (arg) => (arg ? runDetail(arg) : runsView()),
  cluster: async () => clusterView(),
};

const filters = { state: "", topic: "" };
// What the user typed survives a refresh of the view (the view is rebuilt from the API each time).
const drafts = {};

function draft(name, node) {
  if (drafts[name] !== undefined) node.value = drafts[name];
  node.addEventListener("input", () => { drafts[name] = node.value; });
  return node;
}

async function jobsView() {
  const query = new URLSearchParams({ limit: "100" });
  if (filters.state) query.set("state", filters.state);
  if (filters.topic) query.set("topic", filters.topic);
  const data = await api("GET", `/jobs?${query}`);
  const parts = [el("h1", {}, "Jobs")];
  if (can("operator")) {
    const topic = draft("topic", el("input", { id: "submit-topic", placeholder: "job.default", required: true }));
    const prompt = draft("prompt", el("input", { id: "submit-prompt", placeholder: "what the agent asks", required: true }));
    const input = draft("input", el("textarea", { id: "submit-input", placeholder: '{"key": "value"} (optional)' }));
    parts.push(el("form", {
      id: "submit-form",
      onsubmit: (event) => {
        event.preventDefault();
        act("Submit", async () => {
          let context = {};
          if (input.value.trim()) {
            try { context = JSON.parse(input.value); } catch (_) { throw new Error("the input is not JSON"); }
          }
          const accepted = await api("POST", "/jobs", { topic: topic.value.trim(), prompt: prompt.value, context });
          for (const name of ["topic", "prompt", "input"]) delete drafts[name];
          location.hash = `#/jobs/${encodeURIComponent(accepted.job_id)}`;
        });
      },
    }, el("label", {}, "Topic", topic), el("label", {}, "Prompt", prompt), el("label", {}, "Context (JSON)", input), el("button", { type: "submit" }, "Submit job")));
  }
  const state = el("select", { id: "filter-state", onchange: () => { filters.state = state.value; render(); } },
    JOB_STATES.map((s) => el("option", { value: s, selected: s === filters.state }, s || "any state")));
  const topic = el("input", { id: "filter-topic", value: filters.topic, placeholder: "any topic",
    onchange: () => { filters.topic = topic.value.trim(); render(); } });
  parts.push(el("form", { onsubmit: (e) => e.preventDefault() }, el("label", {}, "State", state), el("label", {}, "Topic", topic)));
  const rows = (data.items || []).map((job) => el("tr", {
    class: "clickable", "data-job": job.id, onclick: () => { location.hash = `#/jobs/${encodeURIComponent(job.id)}`; },
  }, el("td", { class: "mono" }, job.id), el("td", {}, job.topic || ""), stateCell(job.state || ""), el("td", {}, fmtTime(job.updated_at))));
  parts.push(table(["Job", "Topic", "State", "Updated"], rows, "No jobs match."));
  return parts;
}

function fields(object, names) {
  return el("dl", {}, names.filter((n) => object[n] !== undefined && object[n] !== null && object[n] !== "")
    .flatMap((n) => [el("dt", {}, n), el("dd", { class: n.endsWith("id") ? "mono" : "" }, typeof object[n] === "object" ? JSON.stringify(object[n]) : String(object[n]))]));
}

async function jobDetail(id) {
  const path = `/jobs/${encodeURIComponent(id)}`;
  const [job, timeline] = await Promise.all([api("GET", path), api("GET", `${path}/timeline`).catch(() => ({ items: [] }))]);
  const parts = [el("h1", {}, "Job ", el("span", { class: "mono" }, job.id)),
    el("p", {}, "State: ", el("span", { id: "job-state", class: `state ${job.state}` }, job.state))];
  const actions = [];
  const terminal = ["SUCCEEDED", "FAILED", "CANCELLED", "DENIED", "TIMEOUT", "OUTPUT_QUARANTINED"].includes(job.state);
  if (can("operator") && !terminal) actions.push(el("button", { class: "danger", onclick: () => act("Cancel", () => api("POST", `${path}/cancel`)) }, "Cancel job"));
  if (actions.length) parts.push(el("div", { class: "actions" }, actions));
  parts.push(fields(job, ["topic", "tenant", "attempts", "retries", "worker_id", "principal", "submitted_by", "safety_decision",
    "safety_reason", "safety_rule_id", "approval_status", "approval_by", "approval_reason", "failure_reason", "error_message",
    "trace_id", "updated_at"]));
  // The job's path: state changes and policy decisions (the gateway's, the scheduler's) in time order.
  parts.push(el("h2", {}, "Timeline"));
  parts.push(table(["When", "Step", "By", "Detail"], (timeline.items || []).map((t) => {
    const decision = t.kind === "decision";
    const step = decision ? `policy ${t.decision || ""}` : t.state || "";
    const detail = decision ? [t.rule_id && `rule ${t.rule_id}`, t.reason].filter(Boolean).join("; ")
      : t.detail ? JSON.stringify(t.detail) : "";
    return el("tr", { class: decision ? "decision" : "state-change" }, el("td", {}, fmtTime(t.at, true)),
      el("td", { class: decision ? "" : `state ${t.state}` }, step), el("td", {}, t.by || ""), el("td", {}, detail));
  }), "Nothing recorded yet."));
  parts.push(el("h2", {}, "Input"), el("pre", {}, JSON.stringify(job.context, null, 2)));
  // What the output policy found: its verdict and findings (never the matched text), and why the
  // result is withheld while a check runs or after a quarantine.
  const safety = job.output_safety || {};
  if (job.output_check || safety.decision) {
    parts.push(el("h2", {}, "Output policy"), fields({ ...safety, output_check: job.output_check }, ["output_check", "decision", "rule_id", "reason"]));
    const findings = (safety.findings || []).map((f) => el("tr", {}, el("td", {}, f.type || ""), el("td", {}, f.severity || ""),
      el("td", {}, f.scanner || ""), el("td", {}, f.length ? `${f.offset || 0}+${f.length}` : ""), el("td", {}, f.detail || "")));
    parts.push(table(["Finding", "Severity", "Scanner", "Where", "Detail"], findings, "No findings."));
  }
  const shown = job.result === null || job.result === undefined ? (job.result_withheld ? `withheld: ${job.result_withheld}` : "—")
    : JSON.stringify(job.result, null, 2);
  parts.push(el("h2", {}, "Result"), el("pre", { id: "job-result" }, shown));
  parts.push(el("p", {}, el("a", { href: "#/jobs" }, "← all jobs")));
  return parts;
}

async function approvalsView() {
  const data = await api("GET", "/approvals?limit=100");
  const rows = (data.items || []).map((item) => {
    const job = item.job || {};
    const reason = draft(`reason:${job.id}`, el("input", { placeholder: "reason", "aria-label": `reason for ${job.id}` }));
    const decide = (verb) => act(verb, () => api("POST", `/approvals/${encodeURIComponent(job.id)}/${verb}`, { reason: reason.value }));
    return el("tr", { "data-job": job.id },
      el("td", { class: "mono" }, el("a", { href: `#/jobs/${encodeURIComponent(job.id)}` }, job.id)),
      el("td", {}, job.topic || ""), el("td", {}, item.policy_reason || ""), el("td", { class: "mono" }, item.policy_rule_id || ""),
      el("td", {}, job.submitted_by || job.principal || ""),
      el("td", {}, can("operator") ? el("div", { class: "actions" }, reason,
        el("button", { class: "approve", onclick: () => decide("approve") }, "Approve"),
        el("button", { class: "danger reject", onclick: () => decide("reject") }, "Reject")) : el("span", { class: "muted" }, "view only")));
  });
  return [el("h1", {}, "Approvals"), table(["Job", "Topic", "Why held", "Rule", "Submitted by", ""], rows, "No jobs wait for approval.")];
}

async function dlqView() {
  const data = await api("GET", "/dlq?limit=200");
  const rows = (data.items || []).map((entry) => {
    const id = entry.job_id;
    const buttons = [];
    if (can("operator")) buttons.push(el("button", { class: "retry", onclick: () => act("Retry", () => api("POST", `/dlq/${encodeURIComponent(id)}/retry`)) }, "Retry"));
    if (can("admin")) buttons.push(el("button", { class: "danger delete", onclick: () => act("Delete", () => api("DELETE", `/dlq/${encodeURIComponent(id)}`)) }, "Delete"));
    return el("tr", { "data-job": id },
      el("td", { class: "mono" }, el("a", { href: `#/jobs/${encodeURIComponent(id)}` }, id)), el("td", {}, entry.topic || ""),
      el("td", {}, entry.status || ""), el("td", {}, entry.reason_code || ""), el("td", {}, entry.reason || ""),
      el("td", {}, fmtTime(entry.created_at)), el("td", {}, el("div", { class: "actions" }, buttons)));
  });
  return [el("h1", {}, "Dead-letter queue"), table(["Job", "Topic", "Status", "Code", "Reason", "When", ""], rows, "The DLQ is empty.")];
}

async function workersView() {
  const data = await api("GET", "/workers");
  const rows = (data.items || []).map((w) => el("tr", { "data-worker": w.worker_id },
    el("td", { class: "mono" }, w.worker_id), el("td", {}, w.pool || ""), el("td", {}, `${w.active_jobs ?? 0} / ${w.max_parallel_jobs ?? "?"}`),
    el("td", {}, w.cpu_load !== undefined ? `${Math.round(w.cpu_load)}%` : ""), el("td", {}, fmtTime(w.last_heartbeat_at)),
    el("td", { class: `state ${w.online ? "online" : "offline"}` }, w.online ? "online" : "offline")));
  return [el("h1", {}, "Workers"), table(["Worker", "Pool", "Jobs", "CPU", "Last heartbeat", ""], rows, "No worker has sent a heartbeat.")];
}

async function runsView() {
  const data = await api("GET", "/workflow-runs?limit=100");
  const rows = (data.items || []).map((run) => el("tr", { class: "clickable", "data-run": run.id, onclick: () => { location.hash = `#/runs/${encodeURIComponent(run.id)}`; } },
    el("td", { class: "mono" }, run.id), el("td", {}, run.workflow_id), stateCell((run.status || "").toUpperCase()),
    el("td", {}, fmtTime(run.created_at)), el("td", {}, fmtTime(run.updated_at))));
  return [el("h1", {}, "Workflow runs"), table(["Run", "Workflow", "Status", "Started", "Updated"], rows, "No workflow runs.")];
}

function layers(steps) {
  // Steps by depth along depends_on, so the DAG reads left to right.
  const depth = {};
  const visit = (id, seen) => {
    if (depth[id] !== undefined) return depth[id];
    if (seen.has(id)) return 0;
    seen.add(id);
    const deps = (steps[id] && steps[id].depends_on) || [];
    depth[id] = deps.length ? 1 + Math.max(...deps.map((d) => (steps[d] ? visit(d, seen) : 0))) : 0;
    return depth[id];
  };
  Object.keys(steps).forEach((id) => visit(id, new Set()));
  const out = [];
  for (const [id, d] of Object.entries(depth)) (out[d] = out[d] || []).push(id);
  return out;
}

async function runDetail(id) {
  const run = await api("GET", `/workflow-runs/${encodeURIComponent(id)}`);
  const [definition, timeline] = await Promise.all([
    api("GET", `/workflows/${encodeURIComponent(run.workflow_id)}`).catch(() => ({ steps: {} })),
    api("GET", `/workflow-runs/${encodeURIComponent(id)}/timeline?limit=200`).catch(() => []),
  ]);
  const defined = definition.steps || {};
  const runSteps = run.steps || {};
  const dag = el("div", { class: "dag" }, layers(defined).map((ids) => el("div", { class: "layer" }, ids.map((sid) => {
    const status = ((runSteps[sid] && runSteps[sid].status) || "pending").toUpperCase();
    return el("div", { class: `step ${status}` }, el("strong", {}, sid), el("div", { class: "muted" }, status));
  }))));
  const parts = [el("h1", {}, "Run ", el("span", { class: "mono" }, run.id)),
    el("p", {}, `Workflow ${run.workflow_id} · `, el("span", { id: "run-status", class: `state ${(run.status || "").toUpperCase()}` }, (run.status || "").toUpperCase()))];
  if (can("operator") && !["succeeded", "failed", "cancelled", "timed_out"].includes(run.status)) {
    parts.push(el("div", { class: "actions" }, el("button", { class: "danger", onclick: () => act("Cancel run", () => api("POST", `/workflow-runs/${encodeURIComponent(id)}/cancel`)) }, "Cancel run")));
  }
  parts.push(el("h2", {}, "Steps"), dag);
  parts.push(el("h2", {}, "Timeline"), table(["When", "Event", "Step", "Message"], (timeline || []).map((e) => el("tr", {},
    el("td", {}, fmtTime(e.timestamp)), el("td", {}, e.type || e.event || ""), el("td", {}, e.step_id || ""), el("td", {}, e.message || ""))), "No events yet."));
  parts.push(el("p", {}, el("a", { href: "#/runs" }, "← all runs")));
  return parts;
}

async function clusterView() {
  const status = await api("GET", "/status");
  const parts = [el("h1", {}, "Cluster")];
  parts.push(fields({
    gateway: status.instance_id, nats: status.nats && status.nats.connected ? "connected" : "disconnected",
    redis: status.redis && status.redis.ok ? "ok" : "error", workers: status.workers && status.workers.count,
    rate_limiter: status.rate_limiter && status.rate_limiter.mode, live_streams_here: status.active_ws_clients,
  }, ["gateway", "nats", "redis", "workers", "rate_limiter", "live_streams_here"]));
  const pipeline = status.pipeline || {};
  parts.push(el("h2", {}, "Your jobs by state (recent)"), table(["State", "Jobs"],
    Object.entries(pipeline).map(([s, n]) => el("tr", {}, stateCell(s), el("td", {}, n))), "No recent jobs."));
  if (!status.replicas) {
    parts.push(el("p", { class: "muted" }, "Replicas and leaders are shown to the operator tenant's admins."));
    return parts;
  }
  parts.push(el("h2", {}, "Leaders"), table(["Loop", "Held by"], Object.entries(status.leaders || {}).map(([loop, holder]) =>
    el("tr", { "data-loop": loop }, el("td", {}, loop), el("td", { class: "mono" }, holder || "— none —")))));
  parts.push(el("h2", {}, "Stream lag"), table(["Queue group", "Subject", "Not delivered", "Not acked"],
    (status.stream_lag || []).map((d) => el("tr", { "data-durable": `${d.queue}/${d.subject}` }, el("td", {}, d.queue),
      el("td", { class: "mono" }, d.subject), el("td", {}, d.pending), el("td", {}, d.ack_pending))),
    "No JetStream durables (core NATS keeps no backlog)."));
  parts.push(el("h2", {}, "Replicas"), el("div", { class: "cards", id: "replicas" }, Object.entries(status.replicas).map(([service, list]) =>
    el("div", { class: "card", "data-service": service }, el("h3", {}, `${service} (${list.length})`),
      el("ul", {}, list.map((r) => el("li", { class: "mono", "data-replica": r.id }, r.id, r.started_at ? ` · since ${fmtTime(r.started_at)}` : "")))))));
  return parts;
}

async function render() {
  if (!session) return;
  if (rendering) {
    renderAgain = true;
    return;
  }
  rendering = true;
  renderAgain = false;
  const name = currentView();
  for (const link of document.querySelectorAll("nav a")) link.classList.toggle("active", link.dataset.view === name);
  try {
    const view = Object.hasOwn(views, name) ? views[name] : views.jobs;
    const content = await view(routeArg());
    if (session) {
      const target = $("view");
      const fresh = el("div", {}, content);
      // Unchanged text: keep the page as it is (no flicker, nothing the user points at replaced).
      if (target.dataset.view !== name || target.textContent !== fresh.textContent) target.replaceChildren(...fresh.childNodes);
      target.dataset.view = name;
      if (renderFailed) showError("");
    }
  } catch (err) {
    showError(err.message);
    renderFailed = true;
  } finally {
    rendering = false;
    if (renderAgain) render();
  }
}

// ---- start ----------------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", async () => {
  $("signin-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    if (await signIn($("key").value.trim(), $("tenant").value.trim())) {
      $("key").value = "";
      showError("");
      layout();
      startLive();
      render();
    }
  });
  $("signout").addEventListener("click", () => signOut(""));
  window.addEventListener("hashchange", () => { showError(""); render(); });
  try { session = JSON.parse(sessionStorage.getItem(SESSION) || "null"); } catch (_) { session = null; }
  layout();
  if (session) {
    startLive();
    render();
  }
});
