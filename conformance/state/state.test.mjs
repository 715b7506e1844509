// An entity's main stream, read over HTTP from a running attache
// (ATTACHE_URL), fed into the real MaterializedState of @durable-streams/state:
// the collections it yields (entity_created, inbox, manifest, entity_stopped)
// must be what the server wrote and answered.
//
//   ATTACHE_URL=http://127.0.0.1:4437 node --test      (dev auth)
//   ATTACHE_TOKEN=att_... also sends Authorization: Bearer (token auth)

import { test } from "node:test"
import assert from "node:assert/strict"
import { createHash, randomUUID } from "node:crypto"
import { MaterializedState, isChangeEvent, isControlEvent } from "@durable-streams/state"

const BASE = process.env.ATTACHE_URL
if (!BASE) throw new Error("set ATTACHE_URL to a running attache server")

const AUTH = process.env.ATTACHE_TOKEN
  ? { authorization: `Bearer ${process.env.ATTACHE_TOKEN}` }
  : { "electric-principal": "user:state-conformance" }

const ENTITY = `/state-conformance/run-${randomUUID()}`
const API = `${BASE}/_electric/entities${ENTITY}`
const MAIN = `${ENTITY}/main`

async function call(method, url, body, extraHeaders = {}) {
  const headers = { ...AUTH, ...extraHeaders }
  let payload = body
  if (body !== undefined && !(body instanceof FormData)) {
    headers["content-type"] = "application/json"
    payload = JSON.stringify(body)
  }
  const res = await fetch(url, { method, headers, body: payload })
  const text = await res.text()
  return { status: res.status, headers: res.headers, body: text ? JSON.parse(text) : undefined }
}

/** Every row of `path` from `offset` until up to date, and the offset to go on from. */
async function readRows(path, offset = "-1") {
  const rows = []
  let closed = false
  for (let pages = 0; pages < 10_000; pages++) {
    const res = await fetch(`${BASE}${path}?offset=${encodeURIComponent(offset)}`, { headers: AUTH })
    assert.equal(res.status, 200, `reading ${path} at ${offset}`)
    assert.match(res.headers.get("content-type") ?? "", /^application\/json/)
    const page = await res.json()
    assert.ok(Array.isArray(page), "a JSON-mode read is an array")
    rows.push(...page)
    offset = res.headers.get("stream-next-offset") ?? offset
    closed = res.headers.get("stream-closed") === "true"
    if (res.headers.get("stream-up-to-date") === "true") return { rows, offset, closed }
  }
  throw new Error(`${path} never caught up`)
}

/** Applies rows as the State Protocol says: change events in order; control messages handled here. */
function apply(state, rows) {
  for (const row of rows) {
    assert.equal(typeof row.headers, "object", `every row has headers: ${JSON.stringify(row)}`)
    if (isControlEvent(row)) {
      if (row.headers.control === "reset") state.clear()
      continue
    }
    assert.ok(isChangeEvent(row), `a change event: ${JSON.stringify(row)}`)
    assert.ok(["insert", "update", "upsert", "delete"].includes(row.headers.operation), JSON.stringify(row))
    assert.equal(typeof row.type, "string", JSON.stringify(row))
    assert.equal(typeof row.key, "string", JSON.stringify(row))
    state.apply(row)
  }
  return state
}

/** A collection as a plain object, key → value. */
const collection = (state, type) => Object.fromEntries(state.getType(type))

const sha256 = (bytes) => createHash("sha256").update(bytes).digest("hex")

// Shared between the tests, which run in order.
const written = {}

test("the main stream materializes to what the server wrote", async () => {
  const spawned = await call("PUT", API, { args: { model: "m-1" }, tags: { suite: "state" } })
  assert.equal(spawned.status, 201, JSON.stringify(spawned.body))
  written.principal = spawned.body.created_by
  assert.equal(spawned.body.streams.main, MAIN)

  const first = await call("POST", `${API}/send`, { payload: { text: "hello" }, key: "msg-1", type: "chat" })
  assert.equal(first.status, 200, JSON.stringify(first.body))
  assert.equal(first.body.key, "msg-1")
  const second = await call("POST", `${API}/send`, { payload: [1, 2, 3] })
  assert.equal(second.status, 200)
  assert.equal(typeof second.body.key, "string")

  const bytes = new TextEncoder().encode("hello, materialized world\n")
  const form = new FormData()
  form.append("id", "att-1")
  form.append("subject", JSON.stringify({ type: "inbox", key: "msg-1" }))
  form.append("meta", JSON.stringify({ source: "state-conformance" }))
  form.append("file", new Blob([bytes], { type: "text/plain" }), "hello.txt")
  const uploaded = await call("POST", `${API}/attachments`, form)
  assert.equal(uploaded.status, 201, JSON.stringify(uploaded.body))

  const doomed = new FormData()
  doomed.append("id", "att-2")
  doomed.append("subject", JSON.stringify({ type: "context", key: "doomed" }))
  doomed.append("file", new Blob(["gone soon"]), "gone.txt")
  assert.equal((await call("POST", `${API}/attachments`, doomed)).status, 201)
  assert.equal((await call("DELETE", `${API}/attachments/att-2`)).status, 200)

  const { rows, offset } = await readRows(MAIN)
  const state = apply(new MaterializedState(), rows)
  written.offset = offset
  written.state = state

  assert.ok(!state.types.includes(undefined), `no bogus types: ${state.types}`)
  assert.deepEqual(
    new Set(state.types),
    new Set(["entity_created", "inbox", "manifest"]),
    `collections: ${state.types}`,
  )

  const created = state.get("entity_created", "entity-created")
  assert.equal(created.entity_type, "state-conformance")
  assert.deepEqual(created.args, { model: "m-1" })

  const inbox = collection(state, "inbox")
  assert.deepEqual(Object.keys(inbox).sort(), ["msg-1", second.body.key].sort())
  assert.deepEqual(inbox["msg-1"].payload, { text: "hello" })
  assert.equal(inbox["msg-1"].from, written.principal)
  assert.equal(inbox["msg-1"].message_type, "chat")
  assert.deepEqual(inbox[second.body.key].payload, [1, 2, 3])
  const inboxTxids = rows.filter((r) => r.type === "inbox").map((r) => r.headers.txid)
  assert.deepEqual(inboxTxids, [first.body.txid, second.body.txid], "each inbox row carries its send's txid")

  const manifest = collection(state, "manifest")
  assert.deepEqual(Object.keys(manifest), ["attachment:att-1"], "the deleted attachment is gone")
  const entry = manifest["attachment:att-1"]
  assert.deepEqual(entry, uploaded.body.attachment, "the manifest row is the answered entry")
  assert.equal(entry.status, "complete")
  assert.equal(entry.kind, "attachment")
  assert.equal(entry.byteLength, bytes.length)
  assert.equal(entry.sha256, sha256(bytes))
  assert.equal(entry.mimeType, "text/plain")
  assert.equal(entry.filename, "hello.txt")
  assert.deepEqual(entry.subject, { type: "inbox", key: "msg-1" })
  assert.deepEqual(entry.meta, { source: "state-conformance" })
  assert.equal(entry.createdBy, written.principal)
  assert.equal(entry.streamPath, `${ENTITY}/attachments/att-1`)

  const listed = await call("GET", `${API}/attachments`)
  assert.deepEqual(listed.body.attachments, [entry], "the server's own list agrees")
  const read = await fetch(`${API}/attachments/att-1`, { headers: AUTH })
  assert.equal(read.status, 200)
  assert.deepEqual(new Uint8Array(await read.arrayBuffer()), bytes)
})

test("reading on from the saved offset continues the same state", async () => {
  assert.ok(written.state, "the first test ran")
  const third = await call("POST", `${API}/send`, { payload: "after the checkpoint", key: "msg-3" })
  assert.equal(third.status, 200)
  const stopped = await call("DELETE", API)
  assert.equal(stopped.status, 200)

  const more = await readRows(MAIN, written.offset)
  assert.ok(more.rows.length >= 2, `new rows after the checkpoint: ${JSON.stringify(more.rows)}`)
  assert.ok(more.closed, "a stopped entity's main stream is closed")
  apply(written.state, more.rows)
  assert.equal(written.state.get("inbox", "msg-3").payload, "after the checkpoint")
  assert.ok(written.state.get("entity_stopped", "entity-stopped"), "the stop is a row")

  const fresh = apply(new MaterializedState(), (await readRows(MAIN)).rows)
  for (const type of new Set([...fresh.types, ...written.state.types])) {
    assert.deepEqual(collection(written.state, type), collection(fresh, type), `collection ${type}`)
  }
})
