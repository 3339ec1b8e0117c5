// Shared by interop-client.mjs and interop-server.mjs: a line protocol on
// stdin/stdout that lets the Rust test (tests/tests/js_interop.rs) drive an
// official automerge-repo `Repo`.
//
// stdout carries only JSON lines:
//   replies  {"id": <n>, "ok": true, ...} / {"id": <n>, "ok": false, "error": "..."}
//   events   {"event": "peer" | "peer-disconnected" | "started" | "listening" | "fatal", ...}
// stdin carries one JSON command per line: {"id": <n>, "cmd": "...", ...}.
// Logs go to stderr.
//
// Values in commands are JSON, with two escapes for automerge scalar types:
// {"$raw": "s"} is a RawString (an automerge scalar string, not text) and
// {"$counter": n} is a Counter. Strings are automerge text, as in the JS API.
// In replies, a BigInt value is written {"$bigint": "decimal digits"}.

import { readFileSync } from "node:fs"
import { createInterface } from "node:readline"

import {
  Counter,
  RawString,
  cbor,
  parseAutomergeUrl,
} from "@automerge/automerge-repo"
// The same module instance automerge-repo uses (its fullfat entry has
// initialised the wasm already).
import * as A from "@automerge/automerge/slim"

export function emit(obj) {
  process.stdout.write(JSON.stringify(obj) + "\n")
}

export function log(...args) {
  process.stderr.write(`[${process.argv[1].split("/").pop()}] ${args.join(" ")}\n`)
}

/** The versions actually installed under node_modules. */
export function versions() {
  const v = name =>
    JSON.parse(
      readFileSync(
        new URL(`./node_modules/${name}/package.json`, import.meta.url)
      )
    ).version
  return {
    node: process.version,
    automerge: v("@automerge/automerge"),
    "automerge-repo": v("@automerge/automerge-repo"),
    "automerge-repo-network-websocket": v(
      "@automerge/automerge-repo-network-websocket"
    ),
    ws: v("ws"),
  }
}

/** Report handshakes as they complete (the `peer` event of the network subsystem). */
export function watchPeers(repo) {
  repo.networkSubsystem.on("peer", ({ peerId, peerMetadata }) =>
    emit({ event: "peer", peerId, peerMetadata: peerMetadata ?? null })
  )
  repo.networkSubsystem.on("peer-disconnected", ({ peerId }) =>
    emit({ event: "peer-disconnected", peerId })
  )
}

/** Kill ourselves if the driving test forgets us. */
export function watchdog() {
  const ms = Number(process.env.INTEROP_WATCHDOG_MS ?? 120000)
  setTimeout(() => {
    emit({ event: "fatal", error: `watchdog: still running after ${ms} ms` })
    process.exit(3)
  }, ms).unref()
}

function fromJson(v) {
  if (Array.isArray(v)) return v.map(fromJson)
  if (v !== null && typeof v === "object") {
    if ("$raw" in v) return new RawString(v.$raw)
    if ("$counter" in v) return new Counter(v.$counter)
    return Object.fromEntries(
      Object.entries(v).map(([k, x]) => [k, fromJson(x)])
    )
  }
  return v
}

// BigInt (how automerge returns some uints) has no JSON form: tag it.
const toJson = doc =>
  JSON.parse(
    JSON.stringify(doc, (_, v) =>
      typeof v === "bigint" ? { $bigint: v.toString() } : v
    )
  )

/** JSON text with object keys sorted, for comparing values. */
function canonical(v) {
  if (Array.isArray(v)) return `[${v.map(canonical).join(",")}]`
  if (v !== null && typeof v === "object")
    return `{${Object.keys(v)
      .sort()
      .map(k => `${JSON.stringify(k)}:${canonical(v[k])}`)
      .join(",")}}`
  return JSON.stringify(v) ?? "undefined"
}

/**
 * A CBOR-decoded value as JSON: byte strings become {"$bytes": "<hex>"} and
 * BigInts (cbor-x decodes every 8-byte integer to one) {"$bigint": "<digits>"}.
 */
function bytesToJson(v) {
  if (v instanceof Uint8Array) return { $bytes: Buffer.from(v).toString("hex") }
  if (typeof v === "bigint") return { $bigint: v.toString() }
  if (Array.isArray(v)) return v.map(bytesToJson)
  if (v !== null && typeof v === "object")
    return Object.fromEntries(
      Object.entries(v).map(([k, x]) => [k, bytesToJson(x)])
    )
  return v
}

function bytesFromJson(v) {
  if (Array.isArray(v)) return v.map(bytesFromJson)
  if (v !== null && typeof v === "object") {
    if ("$bytes" in v) return new Uint8Array(Buffer.from(v.$bytes, "hex"))
    return Object.fromEntries(
      Object.entries(v).map(([k, x]) => [k, bytesFromJson(x)])
    )
  }
  return v
}

function at(obj, path) {
  return path.reduce((o, k) => (o === undefined ? undefined : o[k]), obj)
}

function sleep(ms) {
  return new Promise(resolve => setTimeout(resolve, ms))
}

async function withTimeout(promise, ms, what) {
  let timer
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(
      () => reject(new Error(`timed out after ${ms} ms: ${what}`)),
      ms
    )
  })
  try {
    return await Promise.race([promise, timeout])
  } finally {
    clearTimeout(timer)
  }
}

function applyOp(d, op) {
  const parent = at(d, op.path.slice(0, -1))
  const key = op.path[op.path.length - 1]
  switch (op.op) {
    case "set":
      parent[key] = fromJson(op.value)
      break
    case "push":
      parent[key].push(...fromJson(op.values))
      break
    case "splice":
      A.splice(d, op.path, op.index, op.del, op.insert)
      break
    case "increment":
      parent[key].increment(op.by)
      break
    default:
      throw new Error(`unknown op ${JSON.stringify(op)}`)
  }
}

function snapshot(handle) {
  const doc = handle.doc()
  return { doc: toJson(doc), heads: A.getHeads(doc) }
}

/**
 * The change events of each handle this process has used, from its first
 * use on: the paths each event's patches touched. Listening from the first
 * use (not from the start of a `wait`) counts an event that fired before
 * the wait began, so a test can ask whether one touched a path at all.
 */
const changeLog = new WeakMap()

function watchChanges(handle) {
  if (changeLog.has(handle)) return
  const events = []
  changeLog.set(handle, events)
  handle.on("change", ({ patches }) => events.push((patches ?? []).map(p => p.path)))
}

/** How many logged change events of `handle` touched `path` or below it. */
function eventsTouching(handle, path) {
  const under = p => path.every((key, i) => p[i] === key)
  return (changeLog.get(handle) ?? []).filter(paths => paths.some(under)).length
}

/**
 * Wait until the value at `path` equals `equals` (as JSON, keys sorted). With
 * `noFind`, only look at handles the repo already has (so nothing is
 * requested from peers: the document must have been pushed to us).
 */
async function waitFor(repo, { url, path, equals, timeoutMs = 10000, noFind }) {
  const deadline = Date.now() + timeoutMs
  let handle
  if (noFind) {
    const { documentId } = parseAutomergeUrl(url)
    for (;;) {
      handle = repo.handles[documentId]
      if (handle && handle.isReady()) break
      if (Date.now() > deadline)
        throw new Error(
          `timed out after ${timeoutMs} ms: ${url} was never pushed to this repo ` +
            `(handle ${handle ? "in state " + handle.state : "absent"})`
        )
      await sleep(25)
    }
  } else {
    handle = await withTimeout(repo.find(url), timeoutMs, `find ${url}`)
  }
  watchChanges(handle)
  const want = canonical(equals)
  let changeEvents = 0
  for (;;) {
    const doc = toJson(handle.doc())
    if (canonical(at(doc, path)) === want)
      return { ...snapshot(handle), changeEvents, eventsTouchingPath: eventsTouching(handle, path) }
    const left = deadline - Date.now()
    if (left <= 0)
      throw new Error(
        `timed out after ${timeoutMs} ms waiting for ${JSON.stringify(path)} == ${want}; ` +
          `saw ${JSON.stringify(at(doc, path))} in ${JSON.stringify(doc)} ` +
          `after ${changeEvents} change events`
      )
    // Woken by a change event, or by the deadline.
    await new Promise(resolve => {
      const onChange = () => {
        changeEvents += 1
        clearTimeout(timer)
        resolve()
      }
      const timer = setTimeout(() => {
        handle.off("change", onChange)
        resolve()
      }, left)
      handle.once("change", onChange)
    })
  }
}

/** Ephemeral messages received, by document id (see listen-ephemeral). */
const ephemeral = {}

async function handleCommand(repo, msg) {
  switch (msg.cmd) {
    case "create": {
      const handle = repo.create(fromJson(msg.value))
      watchChanges(handle)
      return { url: handle.url, documentId: handle.documentId, ...snapshot(handle) }
    }
    case "read": {
      const handle = await withTimeout(
        repo.find(msg.url),
        msg.timeoutMs ?? 10000,
        `find ${msg.url}`
      )
      watchChanges(handle)
      return snapshot(handle)
    }
    case "change": {
      const handle = await withTimeout(
        repo.find(msg.url),
        msg.timeoutMs ?? 10000,
        `find ${msg.url}`
      )
      watchChanges(handle)
      handle.change(d => {
        for (const op of msg.ops) applyOp(d, op)
      })
      return snapshot(handle)
    }
    case "wait":
      return waitFor(repo, msg)
    // The CBOR codec the websocket adapters use (cbor-x, tagUint8Array: false).
    case "decode":
      return { value: bytesToJson(cbor.decode(Buffer.from(msg.hex, "hex"))) }
    case "encode":
      return { hex: Buffer.from(cbor.encode(bytesFromJson(msg.value))).toString("hex") }
    case "broadcast": {
      const handle = await withTimeout(repo.find(msg.url), msg.timeoutMs ?? 10000, `find ${msg.url}`)
      handle.broadcast(msg.message)
      return {}
    }
    case "listen-ephemeral": {
      // Start collecting ephemeral messages for a document.
      const handle = await withTimeout(repo.find(msg.url), msg.timeoutMs ?? 10000, `find ${msg.url}`)
      const got = (ephemeral[handle.documentId] ??= [])
      handle.on("ephemeral-message", ({ senderId, message }) =>
        got.push({ senderId, message })
      )
      return {}
    }
    case "wait-ephemeral": {
      const { documentId } = parseAutomergeUrl(msg.url)
      const deadline = Date.now() + (msg.timeoutMs ?? 10000)
      for (;;) {
        const got = ephemeral[documentId] ?? []
        if (got.length > 0) return { messages: got }
        if (Date.now() > deadline)
          throw new Error(`timed out: no ephemeral message for ${msg.url}`)
        await sleep(25)
      }
    }
    case "exit":
      setTimeout(() => process.exit(0), 10)
      await repo.shutdown?.()
      return {}
    default:
      throw new Error(`unknown command ${JSON.stringify(msg.cmd)}`)
  }
}

/** Serve commands from stdin until it closes. */
export function serve(repo) {
  const rl = createInterface({ input: process.stdin })
  rl.on("line", async line => {
    let msg
    try {
      msg = JSON.parse(line)
    } catch (e) {
      emit({ event: "fatal", error: `bad command line ${line}: ${e}` })
      return
    }
    try {
      emit({ id: msg.id, ok: true, ...(await handleCommand(repo, msg)) })
    } catch (e) {
      emit({ id: msg.id, ok: false, error: String(e?.stack ?? e) })
    }
  })
  rl.on("close", () => process.exit(0))
}
