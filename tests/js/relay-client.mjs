// An official automerge-repo client (Repo + WebSocketClientAdapter, no
// storage) of a Tandem relay, driven over stdin/stdout by
// tests/tests/relay_js_interop.rs.
//
//   node relay-client.mjs <ws-url> <peer-id>
//
// stdout carries only JSON lines (logs go to stderr):
//   events   {"event": "started" | "peer" | "peer-disconnected" | "fatal", ...}
//   replies  {"id": n, "ok": true, ...} / {"id": n, "ok": false, "error": "..."}
// Commands on stdin, one JSON object per line, each with an "id":
//   {"cmd": "create", "value": {...}}                -> {url, heads, doc}
//   {"cmd": "set", "url", "key", "value"}            -> {heads, doc}   (root key = value)
//   {"cmd": "acked", "url", "timeoutMs"?}            -> {heads}        once the relay has our heads
//   {"cmd": "wait", "url", "key", "equals", "timeoutMs"?} -> {heads, doc}  once doc[key] == equals
//   {"cmd": "exit"}
//
// "acked" is the relay's acknowledgement as automerge-repo itself records it:
// the heads the relay's store advertised in its last sync message
// (handle.getSyncInfo(relay storage id)) include everything we have. The relay
// advertises only durable heads, so from then on the change survives this
// process and the relay alike.

import { createInterface } from "node:readline"

import { Repo } from "@automerge/automerge-repo"
import { WebSocketClientAdapter } from "@automerge/automerge-repo-network-websocket"

import { emit, log, versions, watchPeers, watchdog } from "./interop-common.mjs"

const [url, peerId] = process.argv.slice(2)
if (!url || !peerId) {
  process.stderr.write("usage: node relay-client.mjs <ws-url> <peer-id>\n")
  process.exit(2)
}

watchdog()
const repo = new Repo({ network: [new WebSocketClientAdapter(url)], peerId })
watchPeers(repo)
emit({ event: "started", peerId, url, versions: versions() })

const sleep = ms => new Promise(resolve => setTimeout(resolve, ms))

async function withTimeout(promise, ms, what) {
  let timer
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms: ${what}`)), ms)
  })
  try {
    return await Promise.race([promise, timeout])
  } finally {
    clearTimeout(timer)
  }
}

/** The document as JSON (automerge numbers are plain JS numbers here). */
const plain = doc => JSON.parse(JSON.stringify(doc))

function sameHeads(a, b) {
  if (!Array.isArray(a) || !Array.isArray(b) || a.length !== b.length) return false
  const [x, y] = [[...a].sort(), [...b].sort()]
  return x.every((h, i) => h === y[i])
}

/** The storage ids of the peers we are connected to (the relay, here). */
function peerStorageIds() {
  return Object.values(repo.peerMetadataByPeerId)
    .map(m => m?.storageId)
    .filter(Boolean)
}

const find = (docUrl, ms) => withTimeout(repo.find(docUrl), ms, `find ${docUrl}`)

async function handle(msg) {
  const ms = msg.timeoutMs ?? 10000
  switch (msg.cmd) {
    case "create": {
      const h = repo.create(msg.value)
      return { url: h.url, heads: h.heads(), doc: plain(h.doc()) }
    }
    case "set": {
      const h = await find(msg.url, ms)
      h.change(d => {
        d[msg.key] = msg.value
      })
      return { heads: h.heads(), doc: plain(h.doc()) }
    }
    case "acked": {
      const h = await find(msg.url, ms)
      const deadline = Date.now() + ms
      for (;;) {
        const ours = h.heads()
        const ids = peerStorageIds()
        if (ids.some(id => sameHeads(h.getSyncInfo(id)?.lastHeads, ours)))
          return { heads: ours }
        if (Date.now() > deadline)
          throw new Error(
            `timed out after ${ms} ms: the relay never advertised our heads ${JSON.stringify(ours)}; ` +
              `peers' storage ids ${JSON.stringify(ids)}, their last heads ` +
              JSON.stringify(ids.map(id => h.getSyncInfo(id)?.lastHeads ?? null))
          )
        await sleep(20)
      }
    }
    case "wait": {
      const h = await find(msg.url, ms)
      const deadline = Date.now() + ms
      for (;;) {
        const doc = plain(h.doc())
        if (JSON.stringify(doc[msg.key]) === JSON.stringify(msg.equals))
          return { heads: h.heads(), doc }
        if (Date.now() > deadline)
          throw new Error(
            `timed out after ${ms} ms waiting for ${msg.key} == ${JSON.stringify(msg.equals)}; ` +
              `the document is ${JSON.stringify(doc)}`
          )
        await sleep(20)
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
    emit({ id: msg.id, ok: true, ...(await handle(msg)) })
  } catch (e) {
    log(`command ${line} failed: ${e?.stack ?? e}`)
    emit({ id: msg.id, ok: false, error: String(e?.stack ?? e) })
  }
})
rl.on("close", () => process.exit(0))
