// Fill a NodeFSStorageAdapter store with the documents `tandem-loadgen seed
// --export FILE` wrote (one JSON line each: {id, heads, data}), under the
// same ids, so the Node sync server (tests/js/bench-sync-server.mjs) serves
// the same documents as the Tandem store in the cold-start benchmark
// (relay/bench/coldstart.sh).
//
//   node relay/bench/seed-node-store.mjs EXPORT_FILE DATA_DIR
//
// Each document is written as automerge-repo's storage writes a compacted
// one: the saved document under [documentId, "snapshot", headsHash], where
// headsHash is the SHA-256 (hex) of the concatenated hex heads
// (automerge-repo 2.5.6, src/storage/keyHash.ts). Going through
// Repo.import instead takes minutes for 10,000 documents and left some of
// them saved empty (its throttled saves race each other). A sample is then
// loaded back through a Repo to check.
//
// The packages are the official automerge-repo 2.5.6 ones installed in
// tests/js (`npm ci --prefix tests/js`); ES modules ignore NODE_PATH, so they
// are resolved from there explicitly.

import { createHash } from "node:crypto"
import { createReadStream } from "node:fs"
import { createRequire } from "node:module"
import { createInterface } from "node:readline"
import { pathToFileURL } from "node:url"

const [exportFile, dir] = process.argv.slice(2)
if (!exportFile || !dir) {
  console.error("usage: node seed-node-store.mjs EXPORT_FILE DATA_DIR")
  process.exit(2)
}

const jsDir = new URL("../../tests/js/package.json", import.meta.url)
const require = createRequire(jsDir)
const load = (name) => import(pathToFileURL(require.resolve(name)).href)
const { Repo } = await load("@automerge/automerge-repo")
const { NodeFSStorageAdapter } = await load("@automerge/automerge-repo-storage-nodefs")

const headsHash = (heads) => createHash("sha256").update(heads.join("")).digest("hex")

const storage = new NodeFSStorageAdapter(dir)
const ids = []
const lines = createInterface({ input: createReadStream(exportFile), crlfDelay: Infinity })
for await (const line of lines) {
  if (!line) continue
  const { id, heads, data } = JSON.parse(line)
  await storage.save([id, "snapshot", headsHash(heads)], Buffer.from(data, "base64"))
  ids.push(id)
}

// Check every 500th document (and the last) loads with its changes.
const repo = new Repo({ network: [], storage: new NodeFSStorageAdapter(dir) })
const sample = ids.filter((_, i) => i % 500 === 0 || i === ids.length - 1)
for (const id of sample) {
  const handle = await repo.find(id)
  if (handle.heads().length === 0) {
    throw new Error(`document ${id} loads empty from ${dir}`)
  }
}
await repo.shutdown()
console.error(`wrote ${ids.length} documents to ${dir} (${sample.length} checked)`)
