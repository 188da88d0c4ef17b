// The intu dashboard: polls the JSON API of `intu serve` and renders it. Plain JavaScript, no
// libraries and no build step, so that it works offline and loads from the package as it is.
// Every value from the server is inserted as text (never as HTML): DICOM tags are written by
// modalities, and a patient name must not be able to run script in an operator's browser.
"use strict";

const API = "api/v1/"; // relative: the dashboard also works behind a proxy under a sub-path
const POLL_MS = 2000;
const CHART_POINTS = 150; // 5 minutes of 2 s samples
const TOKEN_KEY = "intu.operator-token";
// Everything a badge may say: record statuses, event kinds, destination and channel states.
const BADGES = new Set([
  "received", "filtered", "transformed", "errored", "queued", "sent", "attempt", "delivered", "dead", "partial",
  "retried", "purged", "up", "down", "running", "stopped", "starting", "stopping", "listening",
  "not listening",
]);

const state = {
  samples: new Map(), // destination -> [{t, delivered, rate}]
  query: new URLSearchParams(), // the message search shown (empty: the latest messages)
  journeyId: null, // the message whose journey is open
  timer: null,
  busy: false,
};

// -- DOM helpers --------------------------------------------------------------------------------
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key === "dataset") Object.assign(node.dataset, value);
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function svg(tag, attrs) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, String(value));
  return node;
}

const $ = (id) => document.getElementById(id);

// A part of the page is rebuilt only when its data changed: a focused Retry button keeps the
// keyboard focus, selected text stays selected, and a poll that brings nothing new costs nothing.
const renderedData = new WeakMap();
function changed(node, data) {
  const key = JSON.stringify(data);
  if (renderedData.get(node) === key) return false;
  renderedData.set(node, key);
  return true;
}

function fillBody(table, rows, columns, emptyText) {
  const body = table.tBodies[0];
  if (rows.length === 0) {
    body.replaceChildren(el("tr", {}, el("td", { colspan: columns, class: "empty", text: emptyText })));
  } else {
    body.replaceChildren(...rows);
  }
}

// -- formatting ---------------------------------------------------------------------------------
function time(epochSeconds) {
  if (epochSeconds === undefined || epochSeconds === null) return "";
  const d = new Date(epochSeconds * 1000);
  const today = new Date().toDateString() === d.toDateString();
  return today ? d.toLocaleTimeString() : d.toLocaleString();
}

function timeEl(epochSeconds) {
  if (epochSeconds === undefined || epochSeconds === null) return "";
  return el("time", { datetime: new Date(epochSeconds * 1000).toISOString(), text: time(epochSeconds) });
}

function age(seconds) {
  if (seconds === undefined || seconds === null) return "–";
  if (seconds < 1) return "<1 s";
  if (seconds < 120) return `${Math.round(seconds)} s`;
  if (seconds < 7200) return `${Math.round(seconds / 60)} min`;
  if (seconds < 172800) return `${Math.round(seconds / 3600)} h`;
  return `${Math.round(seconds / 86400)} d`;
}

function num(value) {
  return value === undefined || value === null ? "–" : Number(value).toLocaleString();
}

function statusCode(code) {
  // Peer status codes read as DICOM writes them (0xA700), not as decimal (42752).
  if (code === undefined || code === null || code === "") return "";
  return typeof code === "number" ? `0x${code.toString(16).toUpperCase().padStart(4, "0")}` : String(code);
}

function badge(status) {
  const kind = BADGES.has(status) ? status.replace(" ", "-") : "other";
  return el("span", { class: `badge st-${kind}`, dataset: { status }, text: status || "–" });
}

function identifier(record, key) {
  return (record.identifiers && record.identifiers[key]) || "";
}

function listOf(body, key) {
  if (Array.isArray(body)) return body;
  return body && Array.isArray(body[key]) ? body[key] : [];
}

// -- talking to the server ----------------------------------------------------------------------
class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function api(path, options = {}) {
  const response = await fetch(API + path, { cache: "no-store", ...options });
  let body = null;
  try {
    body = await response.json();
  } catch {
    body = null;
  }
  if (!response.ok) {
    const why = (body && body.error) || response.statusText || `HTTP ${response.status}`;
    throw new ApiError(response.status, why);
  }
  return body;
}

async function readiness() {
  // /readyz sits at the root, next to the dashboard; 503 carries the problems.
  const response = await fetch("readyz", { cache: "no-store" });
  let body = null;
  try {
    body = await response.json();
  } catch {
    body = null;
  }
  return { ready: response.ok, problems: (body && (body.problems || body.errors)) || [] };
}

function token() {
  return sessionStorage.getItem(TOKEN_KEY) || "";
}

async function operatorAction(entryId, action) {
  if (!token()) {
    notice("Type the operator token at the top of the page first.", true);
    $("token").focus();
    return false;
  }
  try {
    await api(`entries/${encodeURIComponent(entryId)}/${action}`, {
      method: "POST",
      headers: { Authorization: `Bearer ${token()}` },
    });
  } catch (err) {
    const hint = err.status === 401 || err.status === 403 ? " Check the operator token." : "";
    notice(`${action === "retry" ? "Retry" : "Purge"} of ${entryId} failed: ${err.message}.${hint}`, true);
    return false;
  }
  notice(action === "retry" ? `Entry ${entryId} is queued again.` : `Entry ${entryId} was purged.`);
  refresh();
  return true;
}

function operatorButtons(entryId, label) {
  const retry = el("button", {
    type: "button",
    class: "retry",
    dataset: { entryId },
    "aria-label": `Retry ${label}`,
    text: "Retry",
  });
  retry.addEventListener("click", async () => {
    retry.disabled = true;
    if (!(await operatorAction(entryId, "retry"))) retry.disabled = false;
  });
  const purge = el("button", {
    type: "button",
    class: "purge",
    dataset: { entryId },
    "aria-label": `Purge ${label}`,
    text: "Purge",
  });
  purge.addEventListener("click", async () => {
    if (!window.confirm(`Purge ${label}? Its files are deleted and it is never sent.`)) return;
    purge.disabled = true;
    if (!(await operatorAction(entryId, "purge"))) purge.disabled = false;
  });
  return el("span", { class: "actions" }, retry, purge);
}

// -- notices ------------------------------------------------------------------------------------
let noticeTimer = null;
function notice(text, isError = false) {
  const node = $("notice");
  node.textContent = text;
  node.classList.toggle("error", isError);
  clearTimeout(noticeTimer);
  noticeTimer = setTimeout(() => {
    node.textContent = "";
  }, 10000);
}

function banner(text) {
  const node = $("banner");
  node.hidden = !text;
  node.textContent = text || "";
}

// -- overview -----------------------------------------------------------------------------------
function renderReadiness({ ready, problems }) {
  const node = $("readiness");
  node.dataset.ready = ready ? "yes" : "no";
  node.textContent = ready ? "Ready" : `Not ready: ${problems.join("; ") || "see /readyz"}`;
}

function renderChannels(channels) {
  if (!changed($("channels"), channels)) return;
  const rows = channels.map((c) =>
    el(
      "tr",
      { dataset: { channel: c.name } },
      el("th", { scope: "row", text: c.name }),
      el("td", { text: c.source_type || c.source || "" }),
      el("td", {}, badge(c.state)),
      // null: a source that does not listen on a port (nothing to show).
      el("td", {}, typeof c.listening === "boolean" ? badge(c.listening ? "listening" : "not listening") : "–"),
      el("td", { class: "num", text: num(c.received) }),
      el("td", { class: "num", text: num(c.refused) }),
      el("td", { text: (c.destinations || []).join(", ") }),
    ),
  );
  fillBody($("channels"), rows, 7, "No enabled channel.");
}

function destinationUp(d) {
  // `state` is {up, since, last_error}; an unqueued destination may have none yet.
  const s = d.state;
  if (s && typeof s === "object") return s.up === false ? "down" : "up";
  if (typeof s === "string") return s;
  if (typeof d.up === "boolean") return d.up ? "up" : "down";
  return "";
}

function queueOf(d) {
  return d.queue && typeof d.queue === "object" ? d.queue : d;
}

function renderDestinations(destinations, now) {
  const rows = destinations.flatMap((d) => {
    const q = queueOf(d);
    const up = destinationUp(d);
    const since = d.state && d.state.since;
    const lastError = (d.state && d.state.last_error) || "";
    const samples = state.samples.get(d.name) || [];
    const rate = samples.length ? samples[samples.length - 1].rate : null;
    const stateCell = el("td", { class: "nowrap" }, up ? badge(up) : "–");
    if (up === "down") stateCell.append(" ", el("small", { text: `for ${age(now / 1000 - since)}` }));
    // Why it is down, on a line of its own under the row: a narrow cell would break it up.
    const why = up === "down" && lastError;
    const row = el(
      "tr",
      { dataset: { destination: d.name, up }, class: why ? "has-why" : null },
      el("th", { scope: "row" }, d.name, el("small", { class: "type", text: ` ${d.type || ""}` })),
      stateCell,
      el("td", { class: "num", dataset: { field: "depth" }, text: num(q.depth ?? (q.pending ?? 0) + (q.in_flight ?? 0)) }),
      el("td", { class: "num", text: age(q.oldest_age_s) }),
      el("td", { class: "num", dataset: { field: "delivered" }, text: num(q.delivered ?? d.delivered) }),
      el("td", { class: "num", text: num(d.failed ?? q.failed) }),
      el("td", { class: "num", dataset: { field: "dead" }, text: num(q.dead ?? d.dead) }),
      el("td", { class: "num", text: rate === null ? "–" : rate.toFixed(1) }),
    );
    return why ? [row, el("tr", { class: "why" }, el("td", { colspan: 8, text: `Last error: ${lastError}` }))] : [row];
  });
  fillBody($("destinations"), rows, 8, "No destination in use.");
}

// -- throughput ---------------------------------------------------------------------------------
function sample(destinations, now) {
  // Delivered per second from the change of the delivered count between two polls: the count
  // is what the queue kept, so a reloaded page starts its chart from the next poll.
  for (const d of destinations) {
    const delivered = Number(queueOf(d).delivered ?? d.delivered ?? d.sent ?? 0);
    const list = state.samples.get(d.name) || [];
    const last = list[list.length - 1];
    let rate = null;
    if (last) {
      const seconds = (now - last.t) / 1000;
      rate = seconds > 0 ? Math.max(0, delivered - last.delivered) / seconds : last.rate;
    }
    list.push({ t: now, delivered, rate });
    while (list.length > CHART_POINTS + 1) list.shift();
    state.samples.set(d.name, list);
  }
}

function chart(name, points) {
  const W = 300;
  const H = 64;
  const rates = points.map((p) => p.rate).filter((r) => r !== null);
  const peak = Math.max(1, ...rates);
  const now = rates.length ? rates[rates.length - 1] : 0;
  const step = W / (CHART_POINTS - 1);
  const start = CHART_POINTS - rates.length; // newest point on the right edge
  const xy = rates.map((r, i) => `${((start + i) * step).toFixed(1)},${(H - (r / peak) * (H - 4)).toFixed(1)}`);
  const graphic = svg("svg", {
    viewBox: `0 0 ${W} ${H}`,
    preserveAspectRatio: "none",
    class: "chart",
    role: "img",
    "aria-label": `${name}: ${now.toFixed(1)} delivered per second now, peak ${peak.toFixed(1)} in the last 5 minutes`,
  });
  for (const frac of [0.5, 1]) {
    const y = (H - frac * (H - 4)).toFixed(1);
    graphic.append(svg("line", { x1: 0, x2: W, y1: y, y2: y, class: "gridline" }));
  }
  if (xy.length > 1) {
    const first = xy[0].split(",")[0];
    const lastX = xy[xy.length - 1].split(",")[0];
    graphic.append(svg("polygon", { points: `${first},${H} ${xy.join(" ")} ${lastX},${H}`, class: "area" }));
    graphic.append(svg("polyline", { points: xy.join(" "), class: "line" }));
  }
  return el(
    "figure",
    { class: "chart-box", dataset: { destination: name } },
    el(
      "figcaption",
      {},
      el("strong", { text: name }),
      el("span", { class: "rate", text: `${now.toFixed(1)}/s` }),
      el("span", { class: "peak", text: `peak ${peak.toFixed(1)}/s` }),
    ),
    graphic,
  );
}

function renderCharts() {
  const boxes = [...state.samples.entries()].map(([name, points]) => chart(name, points));
  if (boxes.length) $("charts").replaceChildren(...boxes);
}

// -- dead letters -------------------------------------------------------------------------------
function messageLabel(d) {
  const ids = d.identifiers || (d.message && d.message.identifiers) || {};
  const parts = [];
  if (ids.accession_number) parts.push(`Accession ${ids.accession_number}`);
  if (ids.patient_id) parts.push(`Patient ${ids.patient_id}`);
  if (ids.modality) parts.push(ids.modality);
  return parts.join(" · ");
}

function renderDeadLetters(entries) {
  $("dead-count").textContent = String(entries.length);
  if (!changed($("dead-table"), entries)) return;
  const rows = entries.map((d) => {
    const messageId = d.message_id || (d.message && d.message.id) || "";
    const label = messageLabel(d);
    const open = el("button", {
      type: "button",
      class: "link mono",
      text: label || messageId,
      title: `Message ${messageId}`,
      onclick: () => openJourney(messageId),
    });
    return el(
      "tr",
      { dataset: { entryId: d.id, messageId } },
      el("td", { class: "nowrap", text: d.destination || d.queue || "" }),
      el("td", {}, open),
      el("td", { class: "num", text: num(d.attempts) }),
      el("td", {}, timeEl(d.updated_at ?? d.dead_at)),
      el("td", { class: "reason" }, d.code === null || d.code === undefined ? "" : el("span", { class: "mono", text: `${statusCode(d.code)} ` }), d.reason || d.last_error || ""),
      el("td", {}, operatorButtons(d.id, `the entry of ${label || messageId} for ${d.destination || d.queue}`)),
    );
  });
  fillBody($("dead-table"), rows, 6, "None: every entry was delivered or is still being tried.");
}

// -- message browser ----------------------------------------------------------------------------
function renderMessages(records) {
  const searched = [...state.query.keys()].length > 0;
  if (!changed($("message-table"), [records, state.journeyId, searched])) return;
  const rows = records.map((m) => {
    const open = el("button", {
      type: "button",
      class: "link",
      text: time(m.received_at),
      "aria-label": `Show the journey of message ${m.id}`,
      onclick: () => openJourney(m.id),
    });
    const destinations = Object.entries(m.destinations || {}).map(([name, s]) =>
      el("span", { class: "dest" }, `${name} `, badge(s)),
    );
    return el(
      "tr",
      { dataset: { messageId: m.id }, class: m.id === state.journeyId ? "selected" : null },
      el("td", {}, open),
      el("td", { text: identifier(m, "patient_id") }),
      el("td", { text: identifier(m, "accession_number") }),
      el("td", { text: identifier(m, "modality") }),
      el("td", { class: "mono", text: m.source || m.channel || "" }),
      el("td", {}, badge(m.status)),
      el("td", {}, destinations),
    );
  });
  fillBody($("message-table"), rows, 7, searched ? "No message matches." : "No message yet.");
  $("message-caption").textContent = `${records.length} messages found`;
}

function renderJourney(journey) {
  const m = journey.message;
  $("journey").hidden = false;
  if (!changed($("journey"), journey)) return;
  $("journey-title").replaceChildren(`Message `, el("span", { class: "mono", text: m.id }), " ", badge(m.status));
  const summary = [
    ["Channel", m.channel],
    ["From", m.source],
    ["Received", time(m.received_at)],
    ["Patient ID", identifier(m, "patient_id")],
    ["Accession", identifier(m, "accession_number")],
    ["Modality", identifier(m, "modality")],
    ["Study UID", identifier(m, "study_uid")],
    ["Series UID", identifier(m, "series_uid")],
    ["SOP Instance UID", identifier(m, "sop_instance_uid")],
  ].filter(([, v]) => v);
  $("journey-summary").replaceChildren(
    ...summary.flatMap(([k, v]) => [el("dt", { text: k }), el("dd", { class: k.endsWith("UID") ? "mono" : null, text: v })]),
  );
  // Entries still in a queue: given up on (an operator may retry or purge them) or waiting.
  const givenUp = ["dead", "errored", "partial"].includes(m.status);
  const entries = (journey.entries || []).map((id) =>
    el(
      "p",
      { class: "entry", dataset: { entryId: id } },
      givenUp ? "Given up: entry " : "Waiting in a queue: entry ",
      el("span", { class: "mono", text: id }),
      " ",
      givenUp ? operatorButtons(id, `entry ${id}`) : null,
    ),
  );
  $("journey-entries").replaceChildren(...entries);
  const events = (journey.events || []).map((e) =>
    el(
      "tr",
      { dataset: { kind: e.kind } },
      el("td", {}, timeEl(e.at)),
      el("td", {}, badge(e.kind)),
      el("td", { class: "nowrap", text: e.destination || "" }),
      el("td", { class: "num", text: e.attempt ?? "" }),
      el("td", { class: "mono", text: [statusCode(e.code), e.status].filter(Boolean).join(" ") }),
      el("td", { class: "reason", text: e.detail || "" }),
    ),
  );
  fillBody($("journey-events"), events, 6, "No event recorded.");
  const tags = Object.entries(m.tags || {})
    .sort(([a], [b]) => a.localeCompare(b))
    .map(([k, v]) => el("tr", { dataset: { keyword: k } }, el("th", { scope: "row", text: k }), el("td", { text: v })));
  fillBody($("journey-tags"), tags, 2, "No tags kept for this message.");
}

async function openJourney(messageId) {
  if (!messageId) return;
  state.journeyId = messageId;
  await refreshJourney();
  for (const row of $("message-table").tBodies[0].rows) {
    row.classList.toggle("selected", row.dataset.messageId === messageId);
  }
  $("journey").focus();
}

async function refreshJourney() {
  if (!state.journeyId) return;
  try {
    renderJourney(await api(`messages/${encodeURIComponent(state.journeyId)}`));
  } catch (err) {
    if (err.status === 404) {
      notice(`Message ${state.journeyId} is no longer in the history.`, true);
      closeJourney();
    } else throw err;
  }
}

function closeJourney() {
  state.journeyId = null;
  $("journey").hidden = true;
}

async function refreshMessages() {
  const query = new URLSearchParams(state.query);
  query.set("limit", "100");
  renderMessages(listOf(await api(`messages?${query}`), "messages"));
}

// -- the poll loop ------------------------------------------------------------------------------
async function refresh() {
  if (state.busy) return;
  state.busy = true;
  try {
    const now = Date.now();
    const [channels, destinations, dead, ready] = await Promise.all([
      api("channels"),
      api("destinations"),
      api("dead-letters"),
      readiness(),
    ]);
    const list = listOf(destinations, "destinations");
    sample(list, now);
    renderReadiness(ready);
    renderChannels(listOf(channels, "channels"));
    renderDestinations(list, now);
    renderCharts();
    renderDeadLetters(listOf(dead, "dead_letters"));
    await refreshMessages();
    await refreshJourney();
    banner("");
    $("updated").textContent = new Date(now).toLocaleTimeString();
    $("updated").setAttribute("datetime", new Date(now).toISOString());
  } catch (err) {
    banner(`Cannot read from intu serve (${err.message}); trying again every ${POLL_MS / 1000} s.`);
  } finally {
    state.busy = false;
  }
}

function schedule() {
  clearInterval(state.timer);
  state.timer = document.hidden ? null : setInterval(refresh, POLL_MS);
}

// -- wiring -------------------------------------------------------------------------------------
function showTokenState() {
  const kept = Boolean(token());
  $("token-forget").hidden = !kept;
  $("token").placeholder = kept ? "kept for this tab" : "needed for Retry and Purge";
}

function init() {
  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const value = $("token").value.trim();
    if (value) sessionStorage.setItem(TOKEN_KEY, value);
    $("token").value = "";
    showTokenState();
    notice(value ? "Operator token kept for this tab." : "Type a token first.", !value);
  });
  $("token-forget").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    showTokenState();
    notice("Operator token forgotten.");
  });
  $("search").addEventListener("submit", (event) => {
    event.preventDefault();
    state.query = new URLSearchParams();
    for (const [key, value] of new FormData(event.target)) {
      if (String(value).trim()) state.query.set(key, String(value).trim());
    }
    refreshMessages().catch((err) => notice(`Search failed: ${err.message}`, true));
  });
  $("journey-close").addEventListener("click", closeJourney);
  document.addEventListener("visibilitychange", () => {
    // A hidden tab does not poll; it catches up at once when shown again.
    schedule();
    if (!document.hidden) refresh();
  });
  showTokenState();
  refresh();
  schedule();
}

init();
