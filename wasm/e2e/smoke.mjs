// Browser smoke test of the built package (wasm/pkg) in Debian's headless
// Chromium, driven by playwright-core. Run by tests/tests/wasm_browser.rs,
// which starts a relay and a native Tandem client first.
//
//   node smoke.mjs '{"relay": "ws://127.0.0.1:PORT", "token": "...", "document": "<id>",
//                    "pkg": "/abs/wasm/pkg", "screenshot": "/abs/out.png"}'
//
// The page opens an IndexedDB-backed store, asks the relay for the document
// the native client wrote, reads it, writes a reply, then goes offline, edits,
// reloads (the store reopens from IndexedDB), reconnects, and waits until the
// relay acknowledges everything. The last stdout line is a JSON report.
//
// With "mode": "write" (and no "document"), the page instead creates a
// document, connects to the server given as "relay" (any automerge-repo sync
// server) and waits until the server acknowledges it; the report has its url.
import http from "node:http";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { chromium } from "playwright-core";

const args = JSON.parse(process.argv[2] ?? "{}");
const required = args.mode === "write" ? ["relay", "pkg"] : ["relay", "document", "pkg"];
for (const key of required) {
  if (!args[key]) throw new Error(`missing ${key} in the argument`);
}
const WHOLE_RUN_MS = 120_000;
setTimeout(() => {
  console.error(`smoke test did not finish within ${WHOLE_RUN_MS} ms`);
  process.exit(3);
}, WHOLE_RUN_MS).unref();

const PAGE = `<!doctype html><meta charset="utf-8"><title>tandem-wasm smoke</title>
<body style="font: 16px system-ui; margin: 2em"><h1>tandem-wasm smoke test</h1><pre id="out">loading…</pre></body>`;

// A static server for the package and the page (ES modules need http).
const server = http.createServer((req, res) => {
  const url = new URL(req.url, "http://x");
  if (url.pathname === "/" || url.pathname === "/index.html") {
    res.writeHead(200, { "content-type": "text/html" });
    return res.end(PAGE);
  }
  if (url.pathname.startsWith("/pkg/")) {
    const file = path.join(args.pkg, path.normalize(url.pathname.slice(5)));
    if (file.startsWith(args.pkg) && fs.existsSync(file)) {
      const type = file.endsWith(".wasm") ? "application/wasm"
        : file.endsWith(".js") ? "text/javascript" : "application/octet-stream";
      res.writeHead(200, { "content-type": type });
      return res.end(fs.readFileSync(file));
    }
  }
  res.writeHead(404);
  res.end();
});
await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
const origin = `http://127.0.0.1:${server.address().port}`;

const profile = fs.mkdtempSync(path.join(os.tmpdir(), "tandem-chromium-"));
const context = await chromium.launchPersistentContext(profile, {
  executablePath: "/usr/bin/chromium",
  headless: true,
  args: [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
  ],
});
const page = context.pages()[0] ?? (await context.newPage());
page.on("console", (m) => console.error(`[page ${m.type()}] ${m.text()}`));
page.on("pageerror", (e) => console.error(`[page error] ${e.message}`));

// Runs in the page: open the store, connect, wait for `ready(t)`.
const session = async ({ relay, token, document, phase }) => {
  const until = async (what, check, ms = 30_000) => {
    const end = Date.now() + ms;
    while (!check()) {
      if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
      await new Promise((r) => setTimeout(r, 50));
    }
  };
  const { default: init, Tandem } = await import("/pkg/tandem_wasm.js");
  await init();
  const t = await Tandem.open("smoke");
  const events = [];
  t.subscribe((e) => events.push(e));
  const report = { phase, storageId: t.storageId };
  if (phase === "first") {
    t.request(document);
    t.connect(relay, { token, backoffMinMs: 100, backoffMaxMs: 1000 });
    await until("the native client's title", () => t.get(document, "title") === "from native");
    t.put(document, "reply", "from browser");
    t.putText(document, "notes", "typed in chromium");
    await t.whenPersisted();
    await until("the relay's acknowledgement", () => t.isAcknowledged(document));
    // Offline: the edit is committed to IndexedDB only.
    t.goOffline();
    await until("offline", () => t.connectionState.state === "offline");
    t.put(document, "offline", "made offline");
    t.splice(document, "notes", 0, 5, "TYPED");
    await t.whenPersisted();
    report.offlineAcknowledged = t.isAcknowledged(document);
  } else {
    // After the reload: the offline edit came back from IndexedDB.
    report.afterReload = t.get(document);
    t.connect(relay, { token, backoffMinMs: 100, backoffMaxMs: 1000 });
    await until("online", () => t.connectionState.state === "online");
    await until("the relay's acknowledgement", () => t.isAcknowledged(document));
  }
  report.heads = t.heads(document);
  report.document = t.get(document);
  report.events = [...new Set(events.map((e) => e.type + (e.state ? ":" + e.state : "")))];
  document_out(report);
  return report;

  function document_out(r) {
    window.document.getElementById("out").textContent = JSON.stringify(r, null, 2);
  }
};

// Runs in the page: create a document and push it to the server.
const write = async ({ relay, token }) => {
  const until = async (what, check, ms = 30_000) => {
    const end = Date.now() + ms;
    while (!check()) {
      if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
      await new Promise((r) => setTimeout(r, 50));
    }
  };
  const { default: init, Tandem } = await import("/pkg/tandem_wasm.js");
  await init();
  const t = await Tandem.open("writer");
  const doc = t.create({ title: "from wasm", done: false, tags: ["a", "b"] });
  t.putText(doc, "notes", "hello");
  t.splice(doc, "notes", 5, 0, " world");
  t.putCounter(doc, "votes", 2);
  t.increment(doc, "votes", 3);
  t.connect(relay, { token, backoffMinMs: 100, backoffMaxMs: 1000 });
  await until("the server's acknowledgement", () => t.isAcknowledged(doc));
  return { url: t.url(doc), heads: t.heads(doc), document: t.get(doc) };
};

let exitCode = 0;
try {
  await page.goto(`${origin}/index.html`);
  if (args.mode === "write") {
    console.log(JSON.stringify(await page.evaluate(write, args)));
  } else {
    const first = await page.evaluate(session, { ...args, phase: "first" });
    await page.reload();
    const second = await page.evaluate(session, { ...args, phase: "second" });
    if (args.screenshot) await page.screenshot({ path: args.screenshot, fullPage: true });
    console.log(JSON.stringify({ first, second }));
  }
} catch (e) {
  console.error(`smoke test failed: ${e.stack ?? e}`);
  exitCode = 1;
} finally {
  await context.close();
  server.close();
  fs.rmSync(profile, { recursive: true, force: true });
}
process.exit(exitCode);
