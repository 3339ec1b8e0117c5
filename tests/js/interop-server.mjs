// The ~20-line automerge-repo sync server (official packages), listening on
// an ephemeral port, driven over stdin/stdout by the Rust interop test (see
// interop-common.mjs for the line protocol). Prints
// {"event":"listening","port":N,...} first.
//
//   node interop-server.mjs [peer-id] [keep-alive-ms]
//
// keep-alive-ms (default 5000, the adapter's default) is how often the
// adapter pings each socket; a socket that missed the previous pong is
// terminated.

import { once } from "node:events"

import { Repo } from "@automerge/automerge-repo"
import { WebSocketServerAdapter } from "@automerge/automerge-repo-network-websocket"
import { WebSocketServer } from "ws"

import { emit, serve, versions, watchPeers, watchdog } from "./interop-common.mjs"

const [peerId = "js-server", keepAliveMs = "5000"] = process.argv.slice(2)

watchdog()
const wss = new WebSocketServer({ host: "127.0.0.1", port: 0 })
await once(wss, "listening")
const repo = new Repo({
  network: [new WebSocketServerAdapter(wss, Number(keepAliveMs))],
  peerId,
  // As a sync server does: announce nothing, serve what is asked for.
  sharePolicy: async () => false,
})
watchPeers(repo)
emit({ event: "listening", peerId, port: wss.address().port, versions: versions() })
serve(repo)
