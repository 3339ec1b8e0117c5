// End-to-end test of the browser demo: two headless Chromium pages of
// examples/browser (Debian's /usr/bin/chromium, driven by playwright-core)
// sync through a real Tandem relay; then the official automerge-repo client
// (from tests/js) reads a row document the page wrote, through the relay: in
// Node, and in a third page (the client bundled for the browser by esbuild).
// Run by tests/tests/browser_e2e.rs, which builds wasm/pkg and starts the
// relay:
//
//   node e2e.mjs '{"relay": "ws://127.0.0.1:PORT", "root": "/abs/repo", "screenshot": "/abs/out.png"}'
//
// It serves the repository root on 127.0.0.1:0 (the demo imports
// ../../wasm/pkg), and prints a JSON report as its last stdout line; any
// failed step exits non-zero with the reason.
import http from "node:http";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { pathToFileURL } from "node:url";
import { chromium } from "playwright-core";

const args = JSON.parse(process.argv[2] ?? "{}");
for (const key of ["relay", "root"]) {
  if (!args[key]) throw new Error(`missing ${key} in the argument`);
}
const ROOT = path.resolve(args.root);
const WHOLE_RUN_MS = 150_000;
setTimeout(() => {
  console.error(`the end-to-end run did not finish within ${WHOLE_RUN_MS} ms`);
  process.exit(3);
}, WHOLE_RUN_MS).unref();

for (const file of ["wasm/pkg/tandem_wasm.js", "wasm/pkg/tandem_wasm_bg.wasm", "examples/browser/app.js"]) {
  if (!fs.existsSync(path.join(ROOT, file))) throw new Error(`${file} is missing (run bash wasm/build.sh)`);
}
if (!fs.existsSync("/usr/bin/chromium")) throw new Error("/usr/bin/chromium is missing (apt-get install chromium)");

// ---- a static server for the repository root ------------------------------------

const TYPES = {
  ".html": "text/html; charset=utf-8", ".js": "text/javascript", ".mjs": "text/javascript",
  ".css": "text/css", ".wasm": "application/wasm", ".json": "application/json", ".md": "text/plain",
};
const server = http.createServer((req, res) => {
  let file = path.join(ROOT, path.normalize(decodeURIComponent(new URL(req.url, "http://x").pathname)));
  if (!file.startsWith(ROOT)) { res.writeHead(403); return res.end(); }
  if (fs.existsSync(file) && fs.statSync(file).isDirectory()) file = path.join(file, "index.html");
  if (!fs.existsSync(file)) { res.writeHead(404); return res.end(); }
  res.writeHead(200, { "content-type": TYPES[path.extname(file)] ?? "application/octet-stream", "cache-control": "no-store" });
  res.end(fs.readFileSync(file));
});
await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
const origin = `http://127.0.0.1:${server.address().port}`;

// ---- the browser ----------------------------------------------------------------

const profile = fs.mkdtempSync(path.join(os.tmpdir(), "tandem-demo-chromium-"));
const context = await chromium.launchPersistentContext(profile, {
  executablePath: "/usr/bin/chromium",
  headless: true,
  viewport: { width: 900, height: 760 },
  args: [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
  ],
});

const log = (...a) => console.error("[e2e]", ...a);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function openPage(store) {
  const page = await context.newPage();
  page.on("console", (m) => { if (m.type() !== "log") console.error(`[${store} ${m.type()}] ${m.text()}`); });
  page.on("pageerror", (e) => console.error(`[${store} page error] ${e.message}`));
  await page.goto(`${origin}/examples/browser/?relay=${encodeURIComponent(args.relay)}&store=${store}`);
  await page.waitForFunction(() => window.demo?.ready === true, null, { timeout: 60_000 });
  return page;
}

const state = (page) => page.locator("#connection").getAttribute("data-state");
async function waitState(page, want) {
  await page.waitForFunction((w) => document.querySelector("#connection")?.dataset.state === w, want, { timeout: 30_000 });
}
/** The row as the page's store reads it (values and conflicts). */
const row = (page, key) => page.evaluate((k) => {
  const r = window.demo.tables.get(window.demo.table, k);
  return r && JSON.parse(JSON.stringify(r));
}, key);
/** The task's title and notes as shown on the page. */
const shown = (page, key) => page.evaluate((k) => {
  const li = document.querySelector(`li.task[data-key="${k}"]`);
  if (!li) return null;
  return {
    title: li.querySelector(".title").value,
    done: li.querySelector("input[type=checkbox]").checked,
    notes: li.querySelector(".notes").value,
    votes: li.querySelector(".votes").textContent,
    conflict: li.querySelector(".conflict").hidden ? null : li.querySelector(".conflict").textContent,
  };
}, key);
async function until(what, check, ms = 30_000) {
  const end = Date.now() + ms;
  let last;
  while (Date.now() < end) {
    last = await check();
    if (last) return last;
    await sleep(100);
  }
  throw new Error(`timed out waiting for ${what}`);
}
const task = (page, key) => page.locator(`li.task[data-key="${key}"]`);

const report = {};
let exitCode = 0;
try {
  const a = await openPage("e2e-a");
  const b = await openPage("e2e-b");
  await waitState(a, "online");
  await waitState(b, "online");
  log("both pages online");

  // 1. An edit in A appears in B.
  await a.fill("#new-title", "Water the plants");
  await a.press("#new-title", "Enter");
  const key = await until("the task in A", () => a.evaluate(() => window.demo.tables.scan("tasks")
    .filter((r) => r.values.title === "Water the plants")
    .sort((x, y) => y.values.created - x.values.created)[0]?.key));
  await task(a, key).locator(".notes").fill("Ferns first");
  await task(a, key).locator(".vote").click();
  const inB = await until("A's task in B", async () => {
    const s = await shown(b, key);
    return s && s.title === "Water the plants" && s.notes === "Ferns first" && s.votes === "1" ? s : null;
  });
  report.liveSync = inB;
  log("A's edit appeared in B", inB);

  // 2. B goes offline; both edit the same task.
  await b.click("label.switch");
  await waitState(b, "offline");
  await task(a, key).locator(".title").fill("Water the plants (A)");
  await task(a, key).locator(".title").press("Enter");
  await task(a, key).locator(".notes").press("End");
  await task(a, key).locator(".notes").type(" then the cactus");
  await task(b, key).locator(".title").fill("Water all plants (B, offline)");
  await task(b, key).locator(".title").press("Enter");
  await task(b, key).locator(".notes").focus();
  await task(b, key).locator(".notes").press("Home");
  await task(b, key).locator(".notes").type("Weekly: ");
  await task(b, key).locator("input[type=checkbox]").check();
  await task(b, key).locator(".vote").click();
  await b.evaluate(() => window.demo.tandem.whenPersisted());
  report.offlineBeforeReload = await shown(b, key);
  log("B edited offline", report.offlineBeforeReload);

  // 3. B reloads: its offline edits come back from IndexedDB, still offline.
  await b.reload();
  await b.waitForFunction(() => window.demo?.ready === true, null, { timeout: 60_000 });
  report.afterReload = await until("B's task after the reload", () => shown(b, key));
  report.stateAfterReload = await state(b);
  log("B after reload", report.afterReload, report.stateAfterReload);

  // 4. B reconnects; both pages converge to the same merged row.
  await b.click("label.switch");
  await waitState(b, "online");
  const merged = await until("both pages to show the same merged task", async () => {
    const [ra, rb, sa, sb] = [await row(a, key), await row(b, key), await shown(a, key), await shown(b, key)];
    const same = JSON.stringify(ra) === JSON.stringify(rb) && JSON.stringify(sa) === JSON.stringify(sb);
    const complete = ra && ra.values.notes.includes("then the cactus") && ra.values.notes.includes("Weekly: ")
      && ra.values.votes === 2 && ra.values.done === true;
    return same && complete ? { a: ra, b: rb, shownA: sa, shownB: sb } : null;
  }, 40_000);
  report.merged = merged;
  log("converged", JSON.stringify(merged.shownA));

  // The conflict badge shows the competing titles (last writer wins meanwhile).
  await a.waitForFunction((k) => !document.querySelector(`li.task[data-key="${k}"] .conflict`).hidden, key);
  if (args.screenshot) {
    fs.mkdirSync(path.dirname(args.screenshot), { recursive: true });
    await a.screenshot({ path: args.screenshot, fullPage: true });
  }

  // 5. The official automerge-repo client reads the row document through the relay.
  const documentId = await a.evaluate((k) => window.demo.tables.documentId("tasks", k), key);
  await until("the relay to acknowledge the row", () => a.evaluate((id) => window.demo.tandem.isAcknowledged(id), documentId));
  report.documentId = documentId;
  report.automergeRepo = await readWithAutomergeRepo(documentId);
  report.automergeRepoPage = await readInAPageWithAutomergeRepo(documentId);
  report.key = key;
  console.log(JSON.stringify(report));
} catch (e) {
  console.error(`end-to-end run failed: ${e.stack ?? e}`);
  exitCode = 1;
} finally {
  await context.close();
  server.close();
  fs.rmSync(profile, { recursive: true, force: true });
}
process.exit(exitCode);

/**
 * Read a document through the relay with @automerge/automerge-repo (tests/js)
 * in a page: the client, its websocket adapter and automerge's wasm (as
 * base64) bundled by esbuild into one module.
 */
async function readInAPageWithAutomergeRepo(documentId) {
  const { build } = await import("esbuild");
  const entry = `
    import { Repo, initializeBase64Wasm } from "@automerge/automerge-repo/slim";
    import { automergeWasmBase64 } from "@automerge/automerge/automerge.wasm.base64";
    import { BrowserWebSocketClientAdapter } from "@automerge/automerge-repo-network-websocket";
    window.readWithAutomergeRepo = async (relay, url) => {
      await initializeBase64Wasm(automergeWasmBase64);
      const repo = new Repo({ network: [new BrowserWebSocketClientAdapter(relay)], peerId: "e2e-page-automerge-repo" });
      const handle = await repo.find(url);
      // Timestamps are uints, which automerge reads as BigInt.
      return { url: handle.url, doc: JSON.parse(JSON.stringify(handle.doc(), (_, v) => (typeof v === "bigint" ? Number(v) : v))) };
    };
    window.automergeRepoReady = true;
  `;
  const bundle = await build({
    stdin: { contents: entry, resolveDir: path.join(ROOT, "tests/js"), loader: "js" },
    bundle: true, format: "esm", platform: "browser", write: false, logLevel: "error",
  });
  const page = await context.newPage();
  page.on("pageerror", (e) => console.error(`[automerge-repo page error] ${e.message}`));
  await page.goto(`${origin}/examples/browser/README.md`);
  await page.addScriptTag({ content: bundle.outputFiles[0].text, type: "module" });
  await page.waitForFunction(() => window.automergeRepoReady === true, null, { timeout: 30_000 });
  return await Promise.race([
    page.evaluate(([relay, url]) => window.readWithAutomergeRepo(relay, url), [args.relay, `automerge:${documentId}`]),
    sleep(20_000).then(() => { throw new Error(`automerge-repo in a page could not find ${documentId} within 20 s`); }),
  ]);
}

/** Read a document through the relay with @automerge/automerge-repo (tests/js). */
async function readWithAutomergeRepo(documentId) {
  const modules = path.join(ROOT, "tests/js/node_modules/@automerge");
  const entry = (pkg, file) => {
    const p = path.join(modules, pkg, file);
    if (!fs.existsSync(p)) throw new Error(`${p} is missing (run npm ci --prefix tests/js)`);
    return pathToFileURL(p).href;
  };
  const { Repo } = await import(entry("automerge-repo", "dist/entrypoints/fullfat.js"));
  const { WebSocketClientAdapter } = await import(entry("automerge-repo-network-websocket", "dist/index.js"));
  const version = JSON.parse(fs.readFileSync(path.join(modules, "automerge-repo/package.json"), "utf8")).version;
  const repo = new Repo({ network: [new WebSocketClientAdapter(args.relay)], peerId: "e2e-automerge-repo" });
  try {
    const handle = await Promise.race([
      repo.find(`automerge:${documentId}`),
      sleep(20_000).then(() => { throw new Error(`automerge-repo could not find ${documentId} within 20 s`); }),
    ]);
    // Timestamps are uints, which automerge reads as BigInt.
    const doc = JSON.parse(JSON.stringify(handle.doc(), (_, v) => (typeof v === "bigint" ? Number(v) : v)));
    return { version, url: handle.url, doc };
  } finally {
    await repo.shutdown?.();
  }
}
