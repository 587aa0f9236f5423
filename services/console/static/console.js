// cadenza console: renders the page named by <body data-view> from the JSON APIs and keeps it live
// (the /api/events change feed, and an activity's own message stream). No framework, no build step.
"use strict";

const body = document.body;
const VIEW = body.dataset.view;
const ITEM = body.dataset.id;
const READ_ONLY = body.dataset.readOnly === "true";
const main = document.getElementById("main");

// ---------------------------------------------------------------- small helpers

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") el.className = v;
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "dataset") Object.assign(el.dataset, v);
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

// replaceChildren, leaving out the null / false of optional parts.
function fill(el, ...kids) {
  el.replaceChildren(...kids.flat().filter((k) => k !== null && k !== undefined && k !== false));
}

class ApiError extends Error {}

async function api(path, init) {
  let res;
  try {
    res = await fetch(path, { credentials: "same-origin", ...init });
  } catch (e) {
    throw new ApiError("the console does not answer (is it still running?)");
  }
  let data = null;
  try { data = await res.json(); } catch (e) { /* not JSON */ }
  if (!res.ok) throw new ApiError((data && data.error) || `${res.status} ${res.statusText}`);
  return data;
}

function ago(iso) {
  if (!iso) return "–";
  const s = (Date.now() - Date.parse(iso)) / 1000;
  const a = Math.abs(s);
  const unit = a < 60 ? [a, "s"] : a < 3600 ? [a / 60, "min"] : a < 86400 ? [a / 3600, "h"] : [a / 86400, "d"];
  const n = a < 10 && unit[1] === "s" ? a.toFixed(0) : Math.floor(unit[0]);
  if (a < 2) return "just now";
  return s >= 0 ? `${n} ${unit[1]} ago` : `in ${n} ${unit[1]}`;
}

function absolute(iso) {
  return iso ? new Date(iso).toLocaleString(undefined, { dateStyle: "medium", timeStyle: "medium" }) : "";
}

function when(iso) {
  if (!iso) return h("span", { class: "muted" }, "–");
  return h("time", { datetime: iso, title: absolute(iso), dataset: { rel: "1" } }, ago(iso));
}

function clock(iso) {
  return iso ? new Date(iso).toLocaleTimeString(undefined, { hour12: false }) : "";
}

function duration(ms) {
  if (ms === null || ms === undefined) return "–";
  if (ms < 1000) return `${ms} ms`;
  const s = ms / 1000;
  if (s < 60) return `${s.toFixed(1)} s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m} min ${Math.round(s % 60)} s`;
  return `${Math.floor(m / 60)} h ${m % 60} min`;
}

function since(a) {
  if (a.duration_ms !== null && a.duration_ms !== undefined) return duration(a.duration_ms);
  if (!a.started_at) return "–";
  return duration(Date.now() - Date.parse(a.started_at));
}

function badge(state, title) {
  return h("span", { class: `badge s-${state}`, title: title || null, dataset: { state } }, state);
}

function progress(a, big) {
  const v = Math.max(0, Math.min(100, Number(a.progress) || 0));
  const cls = ["progress", big ? "big" : "", a.status === "success" ? "done" : "",
               a.status === "failed" ? "bad" : ""].join(" ");
  return h("span", { class: big ? "bar-line" : "nowrap" },
    h("span", { class: cls, role: "progressbar", "aria-valuenow": v.toFixed(0), "aria-valuemin": "0",
                "aria-valuemax": "100", dataset: { value: v.toFixed(0) } },
      h("span", { style: `width:${v}%` })),
    h("span", { class: "pct" }, `${v.toFixed(0)}%`));
}

function bytes(n) {
  if (!n && n !== 0) return "–";
  const u = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${u[i]}`;
}

function short(id, n) {
  n = n || 12;
  return id && id.length > n + 3 ? id.slice(0, n) + "…" : id || "–";
}

function params() { return new URLSearchParams(location.search); }

function setParams(p) {
  for (const [k, v] of [...p.entries()]) if (!v) p.delete(k);
  const q = p.toString();
  history.replaceState(null, "", location.pathname + (q ? `?${q}` : ""));
}

function tick() {
  for (const t of document.querySelectorAll("time[data-rel]")) t.textContent = ago(t.getAttribute("datetime"));
  for (const t of document.querySelectorAll("[data-running-since]")) {
    t.textContent = duration(Date.now() - Date.parse(t.dataset.runningSince));
  }
}
setInterval(tick, 1000);

function banner(msg) { return h("div", { class: "banner", role: "alert" }, msg); }

function pager(p, go) {
  return h("div", { class: "pager" },
    h("span", {}, `${p.total} in all · page ${p.page} of ${p.pages}`),
    h("button", { disabled: p.page <= 1, onclick: () => go(p.page - 1), "aria-label": "previous page" }, "‹ Prev"),
    h("button", { disabled: p.page >= p.pages, onclick: () => go(p.page + 1), "aria-label": "next page" }, "Next ›"));
}

function select(name, options, value, onchange, label) {
  return h("select", { name, "aria-label": label || name, onchange: (e) => onchange(e.target.value) },
    options.map(([v, text]) => h("option", { value: v, selected: v === value }, text)));
}

// ---------------------------------------------------------------- live plumbing

// The change feed: every view says which kinds it shows and re-fetches when their counter moves.
let current = null; // { kinds: [...], refresh: async fn }
let versions = {};
let inflight = false;
let again = false;

async function refresh() {
  if (!current) return;
  if (inflight) { again = true; return; }
  inflight = true;
  try { await current.refresh(); } finally {
    inflight = false;
    if (again) { again = false; refresh(); }
  }
}

function follow() {
  const live = document.getElementById("live");
  const es = new EventSource("/api/events");
  es.addEventListener("open", () => { live.className = "live on"; live.title = "live updates: connected"; });
  es.addEventListener("error", () => { live.className = "live off"; live.title = "live updates: reconnecting"; });
  es.addEventListener("change", (e) => {
    const next = JSON.parse(e.data);
    const moved = current && current.kinds.some((k) => next[k] !== versions[k]);
    versions = next;
    if (moved) refresh();
  });
  // Ages (heartbeats, "lost") move with time alone: a slow fallback refresh.
  setInterval(() => { if (current && current.poll) refresh(); }, 5000);
}

function mount(view) {
  current = view;
  return refresh();
}

// ---------------------------------------------------------------- workers

function workersView() {
  const p = params();
  const results = h("div", { class: "panel", id: "workers" });
  const toolbar = h("div", { class: "toolbar" },
    select("state", [["", "all states"], ["live", "live"], ["lost", "lost"], ["stopped", "stopped"]],
           p.get("state") || "", (v) => { p.set("state", v); setParams(p); refresh(); }, "worker state"));
  fill(main, h("h1", {}, "Workers"),
    h("p", { class: "sub" }, "Processes that run work: their tasklist, slots in use and last heartbeat."),
    toolbar, results);
  return {
    kinds: ["workers", "activities"], poll: true,
    async refresh() {
      let data;
      try { data = await api(`/api/workers?${params()}`); } catch (e) { fill(results, banner(e.message)); return; }
      if (!data.items.length) { fill(results, h("div", { class: "empty" }, "No workers have been seen yet.")); return; }
      const rows = data.items.map((w) => h("tr", { dataset: { id: w.worker_id, state: w.state },
                                               class: w.state === "live" ? "" : "dim" },
        h("td", {}, h("div", { class: "mono" }, w.worker_id), w.cause ? h("div", { class: "line2" }, w.cause) : null),
        h("td", {}, badge(w.state, w.cause)),
        h("td", {}, w.tasklist || h("span", { class: "muted" }, "–")),
        h("td", { class: "hide-narrow" }, w.host, w.pid ? h("div", { class: "line2" }, `pid ${w.pid}`) : null),
        h("td", { class: "slots" }, w.sessions_enabled
          ? [h("span", { class: "slot-count" }, `${w.slots_used} / ${w.slots_total}`),
             h("span", { class: "meter" }, h("span", { style: `width:${w.slots_total ? 100 * w.slots_used / w.slots_total : 0}%` }))]
          : h("span", { class: "muted" }, "no sessions")),
        h("td", {}, when(w.last_seen), h("div", { class: "line2" }, w.interval ? `every ${w.interval}s` : "")),
        h("td", {}, w.activities.length
          ? h("div", { class: "chips" }, w.activities.map((a) =>
              h("a", { class: "chip", href: `/activities/${encodeURIComponent(a.id)}` }, a.type)))
          : h("span", { class: "muted" }, w.running_activities ? `${w.running_activities} running` : "idle"))));
      fill(results, h("table", {},
        h("thead", {}, h("tr", {}, ["Worker", "State", "Tasklist", "Host", "Slots", "Heartbeat", "Running"].map((t, i) =>
          h("th", { class: i === 3 ? "hide-narrow" : "" }, t)))),
        h("tbody", {}, rows)), data.pages > 1 ? pager(data, (n) => { p.set("page", n); setParams(p); refresh(); }) : null);
    },
  };
}

// ---------------------------------------------------------------- sessions

function sessionsView(meta) {
  const p = params();
  const results = h("div", { class: "panel", id: "sessions" });
  const go = () => { p.delete("page"); setParams(p); refresh(); };
  const toolbar = h("div", { class: "toolbar" },
    select("state", [["", "all states"], ...meta.session_states.map((s) => [s, s])], p.get("state") || "",
           (v) => { p.set("state", v); go(); }, "session state"),
    select("tasklist", [["", "all tasklists"], ...meta.tasklists.map((t) => [t, t])], p.get("tasklist") || "",
           (v) => { p.set("tasklist", v); go(); }, "tasklist"),
    h("span", { class: "grow" }), h("span", { class: "muted", id: "session-counts" }));
  fill(main, h("h1", {}, "Sessions"),
    h("p", { class: "sub" }, "Open first, then newest. A session holds one slot on one worker until it ends."),
    toolbar, results);
  return {
    kinds: ["sessions"],
    async refresh() {
      let data;
      try { data = await api(`/api/sessions?${params()}`); } catch (e) { fill(results, banner(e.message)); return; }
      document.getElementById("session-counts").textContent =
        Object.entries(data.counts).filter(([, n]) => n).map(([s, n]) => `${n} ${s}`).join(" · ");
      if (!data.items.length) { fill(results, h("div", { class: "empty" }, "No sessions match.")); return; }
      const rows = data.items.map((s) => h("tr", { dataset: { id: s.session_id, state: s.state } },
        h("td", {}, h("a", { class: "mono", href: `/sessions/${encodeURIComponent(s.session_id)}` }, s.session_id),
          s.requested_by ? h("div", { class: "line2" }, `by ${s.requested_by}`) : null),
        h("td", {}, badge(s.state), s.cause ? h("div", { class: "line2 cause-text" }, s.cause) : null),
        h("td", {}, s.tasklist),
        h("td", { class: "hide-narrow mono" }, short(s.worker_id, 28)),
        h("td", {}, when(s.requested_at)),
        h("td", { class: "num" }, s.activity_count)));
      fill(results, h("table", {},
        h("thead", {}, h("tr", {}, ["Session", "State", "Tasklist", "Worker", "Requested", "Activities"].map((t, i) =>
          h("th", { class: (i === 3 ? "hide-narrow" : "") + (i === 5 ? " num" : "") }, t)))),
        h("tbody", {}, rows)), pager(data, (n) => { p.set("page", n); setParams(p); refresh(); }));
    },
  };
}

function sessionView() {
  const results = h("div", { id: "session" });
  fill(main, h("p", {}, h("a", { href: "/sessions" }, "‹ Sessions")), results);
  return {
    kinds: ["sessions", "activities"],
    async refresh() {
      let data;
      try { data = await api(`/api/sessions/${encodeURIComponent(ITEM)}`); } catch (e) {
        fill(results, h("h1", {}, "Session"), banner(e.message)); return;
      }
      const s = data.session;
      const facts = [["Tasklist", s.tasklist], ["Worker", s.worker_id || "–"], ["Host", s.host_name || "–"],
                     ["Requested", when(s.requested_at)], ["Opened", when(s.opened_at)], ["Expires", when(s.expires_at)],
                     ["Ended", when(s.ended_at)], ["Heartbeat timeout", `${s.heartbeat_timeout} s`],
                     ["Requested by", s.requested_by || "–"], ["Recreated from", s.recreated_from || "–"]];
      const tl = [];
      if (s.requested_at) tl.push(["", s.requested_at, `requested on tasklist ${s.tasklist}`]);
      if (s.opened_at) tl.push(["good", s.opened_at, `opened on ${s.worker_id}${s.host_name ? " (" + s.host_name + ")" : ""}`]);
      for (const a of data.activities) {
        if (a.started_at) tl.push(["", a.started_at, `activity ${a.type} started`]);
        if (a.ended_at) tl.push([a.status === "success" ? "good" : a.status === "failed" ? "bad" : "warn", a.ended_at,
                                 `activity ${a.type} ended ${a.status}${a.error ? ": " + a.error : ""}`]);
      }
      if (s.ended_at) tl.push([s.state === "completed" ? "good" : "bad", s.ended_at,
                               `${s.state}${s.cause ? " (" + s.cause + ")" : ""}${s.message ? ": " + s.message : ""}`]);
      tl.sort((a, b) => Date.parse(a[1]) - Date.parse(b[1]));
      fill(results, 
        h("h1", {}, h("span", { class: "mono" }, s.session_id), badge(s.state)),
        s.cause ? h("div", { class: "cause bad", id: "session-cause" }, `${s.cause}${s.message ? ": " + s.message : ""}`) : null,
        h("h2", {}, "Details"),
        h("dl", { class: "grid panel" }, facts.map(([k, v]) => h("div", {}, h("dt", {}, k), h("dd", {}, v)))),
        h("div", { class: "two" },
          h("div", {}, h("h2", {}, "Timeline"), h("ol", { class: "timeline panel" }, tl.map(([cls, at, text]) =>
            h("li", { class: cls }, h("div", {}, text), h("div", { class: "when" }, clock(at), " · ", when(at)))))),
          h("div", {}, h("h2", {}, `Activities (${data.activity_total})`),
            h("div", { class: "panel" }, data.activities.length ? activityTable(data.activities, true)
              : h("div", { class: "empty" }, "No activity ran in this session yet.")))));
    },
  };
}

// ---------------------------------------------------------------- activities

function activityTable(items, compact) {
  const cols = compact ? ["Activity", "Status", "Progress", "Duration"]
                       : ["Activity", "Status", "Resource", "Started by", "Progress", "Latest", "Duration"];
  return h("table", {},
    h("thead", {}, h("tr", {}, cols.map((t) => h("th", { class: ["Resource", "Started by", "Latest"].includes(t) ? "hide-narrow" : "" }, t)))),
    h("tbody", {}, items.map((a) => h("tr", { dataset: { id: a.id, status: a.status } },
      h("td", {}, h("a", { href: `/activities/${encodeURIComponent(a.id)}` }, a.type),
        h("div", { class: "line2" }, a.step || short(a.id, 18))),
      h("td", {}, badge(a.status, a.error || null)),
      compact ? null : h("td", { class: "hide-narrow" }, a.resource_name || a.resource_id || "–",
        a.resource_type ? h("div", { class: "line2" }, a.resource_type) : null),
      compact ? null : h("td", { class: "hide-narrow" }, a.started_by_name || h("span", { class: "muted" }, "System"),
        h("div", { class: "line2" }, when(a.created_at))),
      h("td", {}, progress(a)),
      compact ? null : h("td", { class: "hide-narrow" }, h("div", { class: "ellipsis", title: a.latest_message }, a.latest_message || "–")),
      h("td", { class: "num" }, a.terminal || a.ended_at ? duration(a.duration_ms)
        : a.started_at ? h("span", { dataset: { runningSince: a.started_at } }, since(a)) : "–")))));
}

function activitiesView(meta) {
  const p = params();
  const results = h("div", { class: "panel", id: "activities" });
  const go = () => { p.delete("page"); setParams(p); refresh(); };
  let typing = null;
  const search = h("input", { type: "search", name: "search", placeholder: "search type, resource, message, error…",
    value: p.get("search") || "", "aria-label": "search",
    oninput: (e) => { clearTimeout(typing); typing = setTimeout(() => { p.set("search", e.target.value.trim()); go(); }, 250); } });
  const toolbar = h("div", { class: "toolbar" },
    select("status", [["", "all statuses"], ...meta.statuses.map((s) => [s, s])], p.get("status") || "",
           (v) => { p.set("status", v); go(); }, "status"),
    select("type", [["", "all types"], ...meta.types.map((t) => [t, t])], p.get("type") || "",
           (v) => { p.set("type", v); go(); }, "type"),
    meta.environments.length > 1 || (meta.environments[0] || "") !== ""
      ? select("environment", meta.environments.map((e) => [e, e || "(local)"]), p.get("environment") || "",
               (v) => { p.set("environment", v); go(); }, "environment") : null,
    search);
  fill(main, h("h1", {}, "Activities"),
    h("p", { class: "sub" }, "Running first, then newest. Click one to watch its messages live."), toolbar, results);
  return {
    kinds: ["activities"],
    async refresh() {
      let data;
      try { data = await api(`/api/activities?${params()}`); } catch (e) { fill(results, banner(e.message)); return; }
      if (!data.items.length) { fill(results, h("div", { class: "empty" }, "No activities match.")); return; }
      fill(results, activityTable(data.items, false), pager(data, (n) => { p.set("page", n); setParams(p); refresh(); }));
    },
  };
}

function activityView() {
  const head = h("div", { id: "activity-head" });
  const facts = h("dl", { class: "grid panel", id: "activity-facts" });
  const log = h("div", { class: "log panel", id: "messages", "aria-live": "polite" });
  const timeline = h("ol", { class: "timeline panel", id: "activity-timeline" });
  const note = h("p", { class: "muted", id: "stream-state" }, "connecting…");
  fill(main, h("p", {}, h("a", { href: "/activities" }, "‹ Activities")), head,
    h("h2", {}, "Details"), facts,
    h("div", { class: "two" },
      h("div", {}, h("h2", {}, "Messages ", h("span", { class: "muted", id: "message-count" })), log, note),
      h("div", {}, h("h2", {}, "Timeline"), timeline)));
  let record = null;
  const steps = [];
  let count = 0;

  // The head is built once and updated in place: a Cancel button re-made on every progress update
  // would slip from under the pointer.
  const cancelButton = h("button", { class: "danger", id: "cancel-button", hidden: true,
                                     onclick: () => record && askCancel(record) }, "Cancel…");
  const title = h("span", {});
  const statusHolder = h("span", {});
  const idLine = h("div", { class: "sub mono" });
  const bar = h("div", {});
  const latest = h("p", { id: "latest" });
  const causeHolder = h("div", {});
  fill(head, h("h1", {}, title, statusHolder, h("span", { class: "grow" }), cancelButton), idLine, bar, latest, causeHolder);

  function renderRecord(a) {
    record = a;
    const canCancel = !READ_ONLY && (a.status === "running" || a.status === "queued");
    cancelButton.hidden = !canCancel;
    if (!canCancel) cancelButton.remove();
    title.textContent = a.type;
    fill(statusHolder, badge(a.status));
    idLine.textContent = a.id;
    fill(bar, progress(a, true));
    fill(latest, a.latest_message || h("span", { class: "muted" }, "no message yet"));
    fill(causeHolder, a.error ? h("div", { class: `cause ${a.status === "failed" ? "bad" : ""}`, id: "activity-cause" }, a.error) : null);
    const worker = a.worker_id ? h("span", { class: "mono" }, a.worker_id) : "–";
    const session = a.session_id ? h("a", { class: "mono", href: `/sessions/${encodeURIComponent(a.session_id)}` }, a.session_id) : "–";
    const rows = [["Status", badge(a.status)], ["Step", h("span", { id: "step" }, a.step || "–")],
      ["Resource", [a.resource_type, a.resource_name || a.resource_id].filter(Boolean).join(" ") || "–"],
      ["Started by", a.started_by_name || "System"], ["Environment", a.environment_id || "(local)"],
      ["Started", when(a.started_at)], ["Ended", when(a.ended_at)],
      ["Duration", a.ended_at ? duration(a.duration_ms) : a.started_at ? h("span", { dataset: { runningSince: a.started_at } }, since(a)) : "–"],
      ["Worker", worker], ["Session", session], ["Messages", String(a.message_count)], ["Batch", a.batch_id || "–"]];
    fill(facts, ...rows.map(([k, v]) => h("div", {}, h("dt", {}, k), h("dd", {}, v))));
    renderTimeline();
  }

  function renderTimeline() {
    const a = record;
    if (!a) return;
    const items = [];
    if (a.started_at) items.push(["", a.started_at, `started${a.started_by_name ? " by " + a.started_by_name : ""}` +
                                  (a.worker_id ? ` on ${a.worker_id}` : "")]);
    for (const s of steps) items.push(["", s.at, `step: ${s.step}`]);
    if (a.ended_at) items.push([a.status === "success" ? "good" : a.status === "failed" ? "bad" : "warn", a.ended_at,
                                `ended ${a.status}${a.error ? ": " + a.error : ""}`]);
    fill(timeline, ...items.map(([cls, at, text]) =>
      h("li", { class: cls }, h("div", {}, text), h("div", { class: "when" }, clock(at), " · ", when(at)))));
  }

  function addMessage(m) {
    if (log.querySelector(`[data-seq="${m.seq}"]`)) return; // a resumed stream may repeat the edge
    const near = log.scrollHeight - log.scrollTop - log.clientHeight < 40;
    log.append(h("div", { class: `msg ${m.level}`, dataset: { seq: m.seq } },
      h("span", { class: "seq" }, m.seq), h("span", { class: "at", title: absolute(m.created_at) }, clock(m.created_at)),
      h("span", { class: "text" }, m.message)));
    count += 1;
    document.getElementById("message-count").textContent = `(${count})`;
    if (m.step && (!steps.length || steps[steps.length - 1].step !== m.step)) {
      steps.push({ step: m.step, at: m.created_at });
      renderTimeline();
    }
    if (near) log.scrollTop = log.scrollHeight;
  }

  let es = null;
  function open() {
    es = new EventSource(`/api/activities/${encodeURIComponent(ITEM)}/stream`);
    es.addEventListener("open", () => { note.textContent = "live"; });
    es.addEventListener("activity", (e) => renderRecord(JSON.parse(e.data)));
    es.addEventListener("message", (e) => addMessage(JSON.parse(e.data)));
    es.addEventListener("problem", (e) => { note.textContent = JSON.parse(e.data).error; });
    es.addEventListener("end", async (e) => {
      const status = JSON.parse(e.data).status;
      note.textContent = `ended ${status}; every message is shown`;
      es.close();
      if (record && record.status !== status) {  // the final record did not come: ask for it once
        try { renderRecord((await api(`/api/activities/${encodeURIComponent(ITEM)}`)).activity); } catch (err) { /* the note says the end */ }
      }
    });
    es.addEventListener("error", async () => {
      if (es.readyState === EventSource.CLOSED) {
        // The server refused the stream (a bad or unknown id): say why instead of retrying.
        try { await api(`/api/activities/${encodeURIComponent(ITEM)}`); note.textContent = "stream closed"; }
        catch (err) { fill(head, h("h1", {}, "Activity"), banner(err.message)); note.textContent = ""; }
      } else {
        note.textContent = "reconnecting… (resumes after the last message shown)";
      }
    });
  }
  open();
  return { kinds: [], async refresh() {} };
}

function askCancel(a) {
  const dialog = document.getElementById("cancel-dialog");
  const form = document.getElementById("cancel-form");
  const reason = document.getElementById("cancel-reason");
  const name = document.getElementById("cancel-name");
  const error = document.getElementById("cancel-error");
  name.value = localStorage.getItem("cadenza-console-name") || "";
  reason.value = "";
  error.hidden = true;
  document.getElementById("cancel-back").onclick = () => dialog.close();
  form.onsubmit = async (e) => {
    e.preventDefault();
    if (!reason.value.trim()) { error.textContent = "Say why it should stop."; error.hidden = false; return; }
    localStorage.setItem("cadenza-console-name", name.value.trim());
    const button = document.getElementById("cancel-confirm");
    button.disabled = true;
    try {
      await api(`/api/activities/${encodeURIComponent(a.id)}/cancel`, {
        method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ reason: reason.value.trim(), name: name.value.trim() }),
      });
      dialog.close();
      const b = document.getElementById("cancel-button");
      if (b) { b.disabled = true; b.textContent = "Cancelling…"; b.onclick = null; }
    } catch (err) {
      error.textContent = err.message; error.hidden = false;
    } finally { button.disabled = false; }
  };
  dialog.showModal();
  reason.focus();
}

// ---------------------------------------------------------------- dead letters

function deadLettersView() {
  const p = params();
  const results = h("div", { class: "panel", id: "dead-letters" });
  fill(main, h("h1", {}, "Dead letters"),
    h("p", { class: "sub", id: "dlq-sub" }, "Input a consumer refused, with the reason, newest first."), results);
  return {
    kinds: ["dead_letters"],
    async refresh() {
      let data;
      try { data = await api(`/api/dead-letters?${params()}`); } catch (e) { fill(results, banner(e.message)); return; }
      document.getElementById("dlq-sub").textContent =
        `Input a consumer refused, with the reason, newest first (the last ${data.kept} are kept; ${data.seen} seen since the console started).`;
      if (!data.items.length) { fill(results, h("div", { class: "empty" }, "No dead letters. Everything was taken.")); return; }
      const rows = data.items.map((d) => h("tr", { dataset: { seq: d.seq, consumer: d.consumer || "" } },
        h("td", {}, when(d.stored_at || d.time), h("div", { class: "line2" }, `#${d.seq}`)),
        h("td", {}, h("span", { class: "mono" }, d.consumer || "–"), h("div", { class: "line2 mono" }, d.subject || "")),
        h("td", {}, h("span", { class: "badge s-failed" }, d.error_type || "?")),
        h("td", {}, h("div", { class: "reason" }, d.reason),
          h("details", {}, h("summary", {}, `payload (${bytes(d.payload_size || (d.payload || "").length)}${d.truncated ? ", cut" : ""}) and headers`),
            h("pre", { class: "payload" }, d.payload || "(empty)"),
            d.headers && Object.keys(d.headers).length
              ? h("pre", { class: "payload" }, Object.entries(d.headers).map(([k, v]) => `${k}: ${v}`).join("\n")) : null))));
      fill(results, h("table", {},
        h("thead", {}, h("tr", {}, ["Time", "Consumer", "Error", "Reason"].map((t) => h("th", {}, t)))),
        h("tbody", {}, rows)), pager(data, (n) => { p.set("page", n); setParams(p); refresh(); }));
    },
  };
}

// ---------------------------------------------------------------- health

function healthView() {
  const results = h("div", { id: "health" });
  fill(main, h("h1", {}, "Health"),
    h("p", { class: "sub" }, "The server as this console's connection sees it, and every service process that answers."), results);
  return {
    kinds: ["health"], poll: true,
    async refresh() {
      let data;
      try { data = await api("/api/health"); } catch (e) { fill(results, banner(e.message)); return; }
      const s = data.server;
      const acct = s.account || {};
      const rec = data.recorder;
      fill(results, 
        h("div", { class: "cards" },
          h("div", { class: "card", id: "server-card" }, h("h3", {}, "NATS server", badge(s.connected ? "live" : "lost")),
            h("div", { class: "big" }, s.version ? `v${s.version}` : "?"),
            h("div", { class: "muted" }, s.server_name || s.server_id), h("div", { class: "mono muted" }, s.url),
            s.cluster ? h("div", {}, `cluster ${s.cluster}`) : null),
          h("div", { class: "card" }, h("h3", {}, "JetStream", badge(s.jetstream ? "live" : "lost")),
            s.account_error ? h("div", { class: "error" }, s.account_error)
              : [h("div", { class: "big" }, bytes(acct.storage)), h("div", { class: "muted" },
                 `${acct.streams} streams · ${acct.consumers} consumers · memory ${bytes(acct.memory)}`)]),
          h("div", { class: "card", id: "recorder-card" }, h("h3", {}, "Recorder round trip", badge(rec.error ? "gone" : "live")),
            rec.error ? h("div", { class: "error" }, rec.error)
              : h("div", { class: "big" }, `${rec.rtt_ms.toFixed(1)} ms`), h("div", { class: "muted" }, "a list request, every few seconds")),
          h("div", { class: "card" }, h("h3", {}, "This console", data.console.read_only ? badge("read-only") : null),
            h("div", { class: "big" }, `v${data.console.version}`),
            h("div", { class: "muted" }, `${data.console.activities_cached} activities · ${data.console.sessions_cached} sessions cached`))),
        h("h2", {}, "Services"),
        h("div", { class: "panel", id: "services" }, data.services.length ? h("table", {},
          h("thead", {}, h("tr", {}, ["Service", "State", "Version", "Host", "Started", "Last seen"].map((t, i) =>
            h("th", { class: i === 3 ? "hide-narrow" : "" }, t)))),
          h("tbody", {}, data.services.map((v) => h("tr", { dataset: { service: v.service, state: v.state }, class: v.state === "live" ? "" : "dim" },
            h("td", {}, h("b", {}, v.service), h("div", { class: "line2 mono" }, v.instance)),
            h("td", {}, badge(v.state)), h("td", {}, v.version),
            h("td", { class: "hide-narrow" }, v.host, h("div", { class: "line2" }, `pid ${v.pid}`)),
            h("td", {}, when(v.started_at)), h("td", {}, when(v.last_seen))))))
          : h("div", { class: "empty" }, "No service answers on <prefix>.rpc.services.info.")),
        h("h2", {}, "Streams"),
        h("div", { class: "panel" }, h("table", {},
          h("thead", {}, h("tr", {}, ["Stream", "Messages", "Size", "Consumers", "Replicas"].map((t, i) => h("th", { class: i ? "num" : "" }, t)))),
          h("tbody", {}, s.streams.map((st) => h("tr", {}, h("td", { class: "mono" }, st.name),
            st.error ? h("td", { class: "error", colspan: "4" }, st.error)
              : [h("td", { class: "num" }, st.messages.toLocaleString()), h("td", { class: "num" }, bytes(st.bytes)),
                 h("td", { class: "num" }, st.consumers), h("td", { class: "num" }, st.replicas)]))))));
    },
  };
}

// ---------------------------------------------------------------- start

(async function start() {
  let meta;
  try { meta = await api("/api/meta"); } catch (e) { fill(main, banner(e.message)); return; }
  versions = meta.versions;
  const views = {
    workers: workersView, sessions: ITEM ? sessionView : sessionsView, activities: ITEM ? activityView : activitiesView,
    "dead-letters": deadLettersView, health: healthView,
  };
  follow();
  await mount((views[VIEW] || activitiesView)(meta));
})();
