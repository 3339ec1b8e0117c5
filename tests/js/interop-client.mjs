// An official automerge-repo client, driven over stdin/stdout by the Rust
// interop test (see interop-common.mjs for the line protocol).
//
//   node interop-client.mjs <ws-url> [peer-id]

import { Repo } from "@automerge/automerge-repo"
import { WebSocketClientAdapter } from "@automerge/automerge-repo-network-websocket"

import { emit, serve, versions, watchPeers, watchdog } from "./interop-common.mjs"

const [url, peerId = "js-client"] = process.argv.slice(2)
if (!url) {
  process.stderr.write("usage: node interop-client.mjs <ws-url> [peer-id]\n")
  process.exit(2)
}

watchdog()
const repo = new Repo({ network: [new WebSocketClientAdapter(url)], peerId })
watchPeers(repo)
emit({ event: "started", peerId, url, versions: versions() })
serve(repo)
