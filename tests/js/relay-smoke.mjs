// A smoke check of a running relay with the official automerge-repo client
// (used by .ci/run on the main job):
//
//   node tests/js/relay-smoke.mjs ws://127.0.0.1:3030
//
// One client writes a new document and waits until the relay acknowledges it
// (the relay's store advertises heads that include it), then leaves; a
// second client with an empty repo finds the document by URL through the
// relay and must read the same value. Exit 0 on success, 1 with the reason on
// stderr, within 30 s.

import { Repo } from "@automerge/automerge-repo"
import { WebSocketClientAdapter } from "@automerge/automerge-repo-network-websocket"

const LIMIT_MS = 30000
const url = process.argv[2]
if (!url) {
  process.stderr.write("usage: node relay-smoke.mjs <ws-url>\n")
  process.exit(2)
}

function fail(why) {
  process.stderr.write(`relay smoke check FAILED against ${url}: ${why}\n`)
  process.exit(1)
}
setTimeout(() => fail(`no round trip within ${LIMIT_MS} ms`), LIMIT_MS).unref()

const sleep = ms => new Promise(resolve => setTimeout(resolve, ms))

function sameHeads(a, b) {
  if (!Array.isArray(a) || !Array.isArray(b) || a.length !== b.length) return false
  const [x, y] = [[...a].sort(), [...b].sort()]
  return x.every((h, i) => h === y[i])
}

try {
  const value = `smoke ${new Date().toISOString()} ${Math.random()}`
  const writer = new Repo({
    network: [new WebSocketClientAdapter(url)],
    peerId: `smoke-writer-${process.pid}`,
  })
  const written = writer.create({ smoke: value })
  for (;;) {
    const stores = Object.values(writer.peerMetadataByPeerId)
      .map(m => m?.storageId)
      .filter(Boolean)
    if (stores.some(id => sameHeads(written.getSyncInfo(id)?.lastHeads, written.heads())))
      break
    await sleep(20)
  }
  await writer.shutdown()

  const reader = new Repo({
    network: [new WebSocketClientAdapter(url)],
    peerId: `smoke-reader-${process.pid}`,
  })
  const found = await reader.find(written.url)
  const got = found.doc()?.smoke
  if (got !== value) fail(`read back ${JSON.stringify(got)}, wrote ${JSON.stringify(value)}`)
  await reader.shutdown()
  console.log(`relay smoke check passed: ${written.url} written by one client, read back by another`)
  process.exit(0)
} catch (e) {
  fail(e?.stack ?? String(e))
}
