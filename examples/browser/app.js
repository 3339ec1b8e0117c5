// Tandem Tasks: a collaborative task list on Tandem's row layer, in the
// browser. Every task is a row of the table "tasks" (an automerge document
// stored in this tab's IndexedDB and synced through a Tandem relay), with a
// last-writer-wins title and done flag, a collaborative notes text and a
// votes counter. See README.md in this directory.
import init, { Tandem } from "../../wasm/pkg/tandem_wasm.js";

const params = new URLSearchParams(location.search);
const RELAY = params.get("relay") ?? "ws://127.0.0.1:3030";
const TABLE = "tasks";

// One IndexedDB store per tab (a store is open in one place at a time), kept
// across reloads of the tab: an edit made offline is still there after one.
const STORE_KEY = "tandem-tasks-store";
const storeName = params.get("store") ?? sessionStorage.getItem(STORE_KEY)
  ?? `tasks-${crypto.randomUUID().slice(0, 8)}`;
sessionStorage.setItem(STORE_KEY, storeName);
const OFFLINE_KEY = `tandem-tasks-offline:${storeName}`;

const $ = (id) => document.getElementById(id);
const ui = {
  connection: $("connection"), connectionText: $("connection-text"), offline: $("offline-toggle"),
  form: $("new-task"), title: $("new-title"), list: $("tasks"), empty: $("empty"),
  counts: $("counts"), clearDone: $("clear-done"), error: $("error"),
};
$("relay-url").textContent = RELAY;
$("store-name").textContent = storeName;

function showError(e) {
  ui.error.textContent = e instanceof Error ? e.message : String(e);
  ui.error.hidden = false;
  clearTimeout(showError.timer);
  showError.timer = setTimeout(() => { ui.error.hidden = true; }, 6000);
}

/** Run an edit, showing its error instead of throwing. */
function attempt(edit) {
  try { edit(); } catch (e) { showError(e); }
  render();
}

await init();
const tandem = await Tandem.open(storeName);
const tables = tandem.tables();
tables.defineTable({ name: TABLE, texts: ["notes"], counters: ["votes"], strategy: "lww" });

// ---- connection -------------------------------------------------------------

const STATE_TEXT = {
  online: () => "Online",
  connecting: (s) => (s.attempt > 1 ? `Connecting (attempt ${s.attempt})…` : "Connecting…"),
  waiting: (s) => `Retrying in ${Math.ceil(s.retryInMs / 1000)} s`,
  offline: () => "Offline",
};
function showConnection(state) {
  ui.connection.className = `pill pill-${state.state}`;
  ui.connectionText.textContent = STATE_TEXT[state.state]?.(state) ?? state.state;
  ui.connection.title = state.state === "waiting" ? `Relay unreachable: ${state.error}` : `Relay ${RELAY}`;
  ui.connection.dataset.state = state.state;
}

tandem.subscribe((event) => {
  if (event.type === "connection") showConnection(event);
  if (event.type === "error") console.warn("tandem:", event.message);
});

ui.offline.checked = sessionStorage.getItem(OFFLINE_KEY) === "1";
ui.offline.addEventListener("change", () => {
  sessionStorage.setItem(OFFLINE_KEY, ui.offline.checked ? "1" : "0");
  if (ui.offline.checked) tandem.goOffline(); else tandem.goOnline();
});

tandem.connect(RELAY, { backoffMinMs: 250, backoffMaxMs: 5000 });
if (ui.offline.checked) tandem.goOffline();
tables.syncTable(TABLE);
showConnection(tandem.connectionState);

// ---- rendering ----------------------------------------------------------------

const items = new Map(); // key -> { li, refs }

function newKey() {
  return `${Date.now().toString(36)}-${crypto.randomUUID().slice(0, 6)}`;
}

/** The competing titles of a row, if its title has concurrent versions. */
function competingTitles(row) {
  const versions = row.conflicts.title ?? [];
  return versions.length > 1 ? versions : null;
}

function element(tag, props = {}, children = []) {
  const el = Object.assign(document.createElement(tag), props);
  for (const child of children) el.append(child);
  return el;
}

function createItem(key) {
  const done = element("input", { type: "checkbox", title: "Done" });
  const title = element("input", { className: "title", type: "text", maxLength: 200, ariaLabel: "Title" });
  const votes = element("span", { className: "votes" });
  const up = element("button", { type: "button", className: "icon vote", title: "Vote", textContent: "▲" });
  const del = element("button", { type: "button", className: "icon delete", title: "Delete task", textContent: "✕" });
  const conflict = element("div", { className: "conflict", hidden: true });
  const notes = element("textarea", { className: "notes", rows: 1, placeholder: "Notes (edited together, letter by letter)" });
  const li = element("li", { className: "task" }, [
    done, title, element("div", { className: "actions" }, [up, votes, del]), conflict, notes,
  ]);
  li.dataset.key = key;

  done.addEventListener("change", () => attempt(() => tables.update(TABLE, key, { done: done.checked })));
  title.addEventListener("change", () => attempt(() => tables.update(TABLE, key, { title: title.value.trim() || "Untitled" })));
  title.addEventListener("keydown", (e) => { if (e.key === "Enter") title.blur(); });
  up.addEventListener("click", () => attempt(() => tables.increment(TABLE, key, "votes", 1)));
  del.addEventListener("click", () => attempt(() => tables.delete(TABLE, key)));
  // Send each keystroke as the smallest splice, so concurrent edits of the
  // same notes interleave instead of overwriting each other.
  notes.addEventListener("input", () => {
    const before = notes.dataset.text ?? "";
    const after = notes.value;
    let start = 0;
    while (start < before.length && start < after.length && before[start] === after[start]) start++;
    let end = 0;
    while (end < before.length - start && end < after.length - start
      && before[before.length - 1 - end] === after[after.length - 1 - end]) end++;
    notes.dataset.text = after;
    try {
      tables.spliceText(TABLE, key, "notes", start, before.length - start - end, after.slice(start, after.length - end));
    } catch (e) { showError(e); render(); }
    autosize(notes);
  });
  const refs = { done, title, votes, conflict, notes };
  return { li, refs };
}

function autosize(textarea) {
  textarea.style.height = "auto";
  textarea.style.height = `${textarea.scrollHeight + 2}px`;
}

/** Put `text` in a field without losing the caret if the user is in it. */
function setText(field, text) {
  if (field.value === text) return;
  if (document.activeElement === field) {
    const { selectionStart, selectionEnd } = field;
    field.value = text;
    field.setSelectionRange(Math.min(selectionStart, text.length), Math.min(selectionEnd, text.length));
  } else {
    field.value = text;
  }
}

function renderConflict(box, key, row) {
  const versions = competingTitles(row);
  box.hidden = !versions;
  if (!versions) return;
  box.replaceChildren(element("strong", { textContent: "Edited at the same time:" }));
  for (const v of versions) {
    const chosen = v.value === row.values.title;
    const b = element("button", {
      type: "button", className: `choice${chosen ? " winner" : ""}`,
      textContent: `${v.value}${chosen ? " ✓" : ""}`,
      title: `${chosen ? "Shown now (last writer wins). " : ""}Written ${new Date(v.at.millis).toLocaleTimeString()} by ${v.at.replica.slice(0, 8)}. Click to keep this one.`,
    });
    b.addEventListener("click", () => attempt(() => tables.update(TABLE, key, { title: v.value })));
    box.append(b);
  }
}

function render() {
  const rows = tables.scan(TABLE).sort((a, b) =>
    (a.values.created ?? 0) - (b.values.created ?? 0) || a.key.localeCompare(b.key));
  const seen = new Set();
  let previous = null;
  for (const row of rows) {
    seen.add(row.key);
    let item = items.get(row.key);
    if (!item) {
      item = createItem(row.key);
      items.set(row.key, item);
    }
    const { li, refs } = item;
    const title = row.values.title ?? "";
    if (document.activeElement !== refs.title) setText(refs.title, title);
    refs.done.checked = row.values.done === true;
    refs.votes.textContent = String(row.values.votes ?? 0);
    const notes = row.values.notes ?? "";
    setText(refs.notes, notes);
    refs.notes.dataset.text = notes;
    autosize(refs.notes);
    li.classList.toggle("done", row.values.done === true);
    li.classList.toggle("conflicted", !!competingTitles(row));
    renderConflict(refs.conflict, row.key, row);
    // Keep the list in order without recreating nodes (focus survives).
    const expected = previous ? previous.nextSibling : ui.list.firstChild;
    if (expected !== li) ui.list.insertBefore(li, expected);
    previous = li;
  }
  for (const [key, { li }] of items) {
    if (!seen.has(key)) { li.remove(); items.delete(key); }
  }
  const done = rows.filter((r) => r.values.done === true).length;
  ui.counts.textContent = rows.length === 0 ? "No tasks yet" : `${rows.length - done} to do · ${done} done`;
  ui.clearDone.hidden = done === 0;
  ui.empty.hidden = rows.length > 0;
}

function flash(key) {
  const li = items.get(key)?.li;
  if (!li) return;
  li.classList.add("flash");
  setTimeout(() => li.classList.remove("flash"), 600);
}

// Rows changed here or by a peer: redraw (batched per frame).
let scheduled = false;
tables.subscribeRows((event) => {
  if (event.table !== TABLE) return;
  if (!scheduled) {
    scheduled = true;
    requestAnimationFrame(() => { scheduled = false; render(); });
  }
  if (event.origin === "remote") requestAnimationFrame(() => flash(event.key));
});

ui.form.addEventListener("submit", (e) => {
  e.preventDefault();
  const title = ui.title.value.trim();
  if (!title) return;
  attempt(() => tables.insert(TABLE, newKey(), { title, done: false, created: Date.now() }));
  ui.title.value = "";
});
ui.clearDone.addEventListener("click", () => attempt(() => {
  for (const row of tables.scan(TABLE)) if (row.values.done === true) tables.delete(TABLE, row.key);
}));

render();
ui.title.focus();

// For scripts driving the page (examples/browser/e2e.mjs) and the console.
window.demo = { tandem, tables, table: TABLE, storeName, render, ready: true };
