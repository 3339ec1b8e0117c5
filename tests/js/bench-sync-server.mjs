// The reference automerge-repo sync server for the fan-out benchmark
// (relay/bench/fanout.sh): the official 2.5.6 packages, storing on disk with
// NodeFSStorageAdapter, as PEERS.md describes it.
//
//   node bench-sync-server.mjs DATA_DIR [port]
//
// Prints one line `node sync server listening on ws://127.0.0.1:PORT` once it
// accepts connections (port 0, the default, picks a free one). Stops on
// SIGTERM or SIGINT.

import { once } from "node:events"

import { Repo } from "@automerge/automerge-repo"
import { WebSocketServerAdapter } from "@automerge/automerge-repo-network-websocket"
import { NodeFSStorageAdapter } from "@automerge/automerge-repo-storage-nodefs"
import { WebSocketServer } from "ws"

const [dir, port = "0"] = process.argv.slice(2)
if (!dir) {
  console.error("usage: node bench-sync-server.mjs DATA_DIR [port]")
  process.exit(2)
}

const wss = new WebSocketServer({ host: "127.0.0.1", port: Number(port) })
await once(wss, "listening")
const repo = new Repo({
  network: [new WebSocketServerAdapter(wss)],
  storage: new NodeFSStorageAdapter(dir),
  peerId: `bench-sync-server-${process.pid}`,
  // As a sync server does: announce nothing, serve what is asked for.
  sharePolicy: async () => false,
})
console.log(`node sync server listening on ws://127.0.0.1:${wss.address().port}`)

const stop = async () => {
  try {
    await repo.shutdown()
  } finally {
    wss.close()
    process.exit(0)
  }
}
process.on("SIGTERM", stop)
process.on("SIGINT", stop)
