// A non-Python cadenza client, written from docs/wire.md and schemas/json/ only, with the official
// `nats` npm client. Driven by tests/test_interop_node.py against a real server and real services.
//
//   node client.mjs --url nats://127.0.0.1:4222 --prefix cadenza --tasklist interop
//
// Runs three scenarios and prints one JSON line per scenario ({"scenario": ..., ...}) and "done":
//   track:   announce an activity, write messages, update it (no rev), complete it; read it back
//   cancel:  run `sleep` on a Python worker through the tasklist queue, cancel it as a user
//   session: request a session, run `echo` in it through the worker's inbox, complete it, recreate it
import { connect, headers, createInbox } from "nats";
import { randomUUID } from "node:crypto";

const args = Object.fromEntries(
  process.argv.slice(2).reduce((acc, v, i, all) => (i % 2 ? acc : [...acc, [v.replace(/^--/, ""), all[i + 1]]]), []),
);
const P = args.prefix ?? "cadenza";
const TASKLIST = args.tasklist ?? "default";
const enc = new TextEncoder();
const dec = new TextDecoder();
const nc = await connect({ servers: args.url ?? "nats://127.0.0.1:4222", name: "interop-node" });
const js = nc.jetstream();

function fail(what) {
  throw new Error(what);
}

// docs/wire.md, "Headers": Nats-Msg-Id is the body's event_id; the version header equals schema_version.
async function publishEvent(subject, type, body) {
  const event = { event_id: randomUUID(), schema_version: 1, source: "interop-node", ...body, type };
  const h = headers();
  h.set("Content-Type", "application/json");
  h.set("Cadenza-Schema-Version", String(event.schema_version));
  h.set("Cadenza-Event-Type", type);
  const ack = await js.publish(subject, enc.encode(JSON.stringify(event)), { msgID: event.event_id, headers: h });
  return { event, ack };
}

// docs/wire.md, "The recorder's endpoints": the reply is {"ok": true, "result": ...} or the error reply.
async function rpc(method, request) {
  const msg = await nc.request(`${P}.rpc.recorder.${method}`, enc.encode(JSON.stringify(request)), { timeout: 10000 });
  const reply = JSON.parse(dec.decode(msg.data));
  if (!reply.ok) {
    const err = new Error(`${method}: ${reply.error.code}: ${reply.error.message}`);
    err.code = reply.error.code;
    throw err;
  }
  return reply.result;
}

async function until(what, fn, timeoutMs = 30000) {
  const end = Date.now() + timeoutMs;
  let last;
  while (Date.now() < end) {
    try {
      last = await fn();
      if (last) return last;
    } catch (e) {
      if (e.code !== "not_found") throw e;
    }
    await new Promise((r) => setTimeout(r, 50));
  }
  fail(`timed out waiting for ${what}`);
}

async function nextAnnouncement(sub, types, timeoutMs) {
  const end = Date.now() + timeoutMs;
  while (Date.now() < end) {
    const event = JSON.parse(dec.decode((await firstMessage(sub, end - Date.now(), types.join(" or "))).data));
    if (types.includes(event.type)) return event;
  }
  fail(`no ${types.join(" or ")} within ${timeoutMs} ms`);
}

// The next message of a subscription, or an error after timeoutMs (one iterator per subscription, so
// reading again goes on where the last read stopped).
const iterators = new WeakMap();
async function firstMessage(sub, timeoutMs, what) {
  if (!iterators.has(sub)) iterators.set(sub, sub[Symbol.asyncIterator]());
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`no ${what} within ${timeoutMs} ms`)), Math.max(timeoutMs, 1));
  });
  try {
    const next = await Promise.race([iterators.get(sub).next(), timeout]);
    if (next.done) fail(`the subscription ended before a ${what}`);
    return next.value;
  } finally {
    clearTimeout(timer);
  }
}

// ------------------------------------------------------------------ (a) track an activity
async function track() {
  const id = randomUUID();
  const s = (ev) => `${P}.activity.${id}.${ev}`;
  await publishEvent(s("started"), "activity.started", {
    event_id: `${id}.started`, activity_id: id, activity_type: "node_import", resource_name: "catalog.csv",
    message: "starting", rev: 1,
  });
  await publishEvent(s("message"), "activity.message", {
    event_id: `${id}.msg.1`, activity_id: id, seq: 1, rev: 2,
    entries: [{ message: "read 10 rows", progress: 10 }, { level: "warning", message: "row 7 skipped", step: "read" }],
  });
  // No rev: applied in arrival order (docs/wire.md, "Track an activity").
  await publishEvent(s("updated"), "activity.updated", { activity_id: id, progress: 60, step: "write" });
  await until("the update", async () => (await rpc("get", { activity_id: id })).activity.progress === 60);
  await publishEvent(s("completed"), "activity.completed", {
    event_id: `${id}.completed`, activity_id: id, status: "success", rev: 3,
    final: { level: "success", message: "imported 10 rows" }, final_seq: 3, result: { rows: 10 },
  });
  const got = await until("the completion", async () => {
    const r = await rpc("get", { activity_id: id });
    return r.activity.status === "success" ? r : null;
  });
  const found = await rpc("list", { search: id.slice(0, 8) });
  return {
    scenario: "track", activity_id: id, status: got.activity.status, progress: got.activity.progress,
    message_count: got.activity.message_count, last_seq: got.activity.last_seq,
    latest_message: got.activity.latest_message, messages: got.messages.map((m) => m.message),
    found_by_prefix: found.items.some((a) => a.id === id),
  };
}

// ------------------------------------------------------------------ (b) cancel a Python worker's activity
async function cancel() {
  const id = randomUUID();
  const replyTo = `${createInbox()}.${id}`;
  const replies = nc.subscribe(replyTo, { max: 1 });
  await publishEvent(`${P}.task.${TASKLIST}.queued`, "task.activity", {
    activity_id: id, name: "sleep", args: [60], tasklist: TASKLIST, reply_to: replyTo,
  });
  await until("the activity to run", async () => (await rpc("get", { activity_id: id })).activity.status === "running");
  const answer = await rpc("cancel", { activity_id: id, who: "node", reason: "interop test" });
  const result = JSON.parse(dec.decode((await firstMessage(replies, 30000, "activity result")).data));
  const ended = await until("the cancelled record", async () => {
    const r = await rpc("get", { activity_id: id });
    return r.activity.status === "cancelled" ? r : null;
  });
  return {
    scenario: "cancel", activity_id: id, outcome: answer.outcome, ok: result.ok, error: result.error,
    status: ended.activity.status, record_error: ended.activity.error,
  };
}

// ------------------------------------------------------------------ (c) a session end to end
async function openSession(body) {
  const sid = randomUUID();
  const announcements = nc.subscribe(`${P}.session.${sid}.*`);
  await publishEvent(`${P}.session.${sid}.requested`, "session.requested", {
    session_id: sid, tasklist: TASKLIST, creation_timeout: 20, execution_timeout: 120, heartbeat_timeout: 10, ...body,
  });
  // The wildcard also carries our own request: the broker's answer is assigned or rejected.
  const event = await nextAnnouncement(announcements, ["session.assigned", "session.rejected"], 30000);
  if (event.type !== "session.assigned") fail(`session ${sid}: ${event.type} ${event.message ?? ""}`);
  return { sid, assigned: event, announcements };
}

async function runInSession(assigned, name, args) {
  const id = randomUUID();
  const replyTo = `${createInbox()}.${id}`;
  const replies = nc.subscribe(replyTo, { max: 1 });
  await publishEvent(`${P}.task.${assigned.worker_id}.inbox`, "task.activity", {
    activity_id: id, name, args, tasklist: TASKLIST, worker_id: assigned.worker_id,
    session_id: assigned.session_id, reply_to: replyTo,
  });
  return { activity_id: id, ...JSON.parse(dec.decode((await firstMessage(replies, 30000, "activity result")).data)) };
}

async function complete(sid, announcements) {
  await publishEvent(`${P}.session.${sid}.complete`, "session.complete", { session_id: sid, reason: "done" });
  const event = await nextAnnouncement(announcements, ["session.completed", "session.failed"], 30000);
  announcements.unsubscribe();
  return event.type;
}

async function session() {
  const one = await openSession({});
  const ran = await runInSession(one.assigned, "echo", [{ from: "node", n: [1, 2, 3] }]);
  const ended = await complete(one.sid, one.announcements);
  const two = await openSession({ recreate_token: one.assigned.recreate_token });
  const where = await runInSession(two.assigned, "where", []);
  const ended2 = await complete(two.sid, two.announcements);
  return {
    scenario: "session", session_id: one.sid, worker_id: one.assigned.worker_id, ok: ran.ok, result: ran.result,
    activity_id: ran.activity_id, ended, recreated_session_id: two.sid, recreated_worker_id: two.assigned.worker_id,
    recreated_where: where.result, recreated_ended: ended2,
  };
}

try {
  for (const scenario of [track, cancel, session]) {
    console.log(JSON.stringify(await scenario()));
  }
  console.log("done");
} finally {
  await nc.drain();
}
