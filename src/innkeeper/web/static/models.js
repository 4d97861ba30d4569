// The Models panel: every model the server can serve, Load/Unload with settings, Tune (tune.js),
// pulls from the hub with progress and cancel, and deleting pulled models. Text goes in with
// textContent only.
// An older server without the registry routes answers 404: the panel then stays hidden.

import { ApiError, getJson, postJson, request } from "./api.js";
import { state } from "./state.js";
import { refreshTuned, tuneControls, updateTune } from "./tune.js";
import { $, formatBytes, toast, verdictClass } from "./ui.js";

const KV_TYPES = ["f16", "bf16", "f32", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "iq4_nl"];
const FLASH = ["auto", "on", "off"];
// HOST:PORT[,HOST:PORT…] as the browser can check it; the server checks the rest (its rules)
const RPC_PATTERN = String.raw`\s*[A-Za-z0-9.\-]+:[0-9]{1,5}(\s*,\s*[A-Za-z0-9.\-]+:[0-9]{1,5})*\s*`;
const FAST_POLL_MS = 1000; // while a model loads or a pull runs
const PULL_POLL_MS = 500;

let changed = () => {}; // set by initModels: the page refreshes what hangs on the default model
let available = null; // null: not known yet; false: the server has no registry routes
let list = { default: null, models: [] };
const items = new Map(); // model id -> {li, refs}: built once, updated in place
const busy = new Set(); // ids with a Load/Unload/Delete request in flight from this page
let nextId = 0;
let fastTimer = 0;
let pullJob = null;

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("aria-") || k.startsWith("data-") || k === "for") node.setAttribute(k, v);
    else node[k] = v;
  }
  node.append(...children);
  return node;
}

/** A labelled field of the load-settings form; the label's `for` names the control. */
function field(label, control) {
  control.id = `ms-${nextId++}`;
  return el("div", { class: "field" }, el("label", { for: control.id, text: label }), control);
}

function select(options, value) {
  const s = el("select");
  for (const o of options) s.append(el("option", { value: o, text: o }));
  if (value !== undefined && value !== null && !options.includes(String(value))) s.append(el("option", { value: String(value), text: String(value) }));
  if (value !== undefined && value !== null) s.value = String(value);
  return s;
}

function flashValue(v) {
  if (v === true) return "on";
  if (v === false) return "off";
  return v ?? "auto";
}

function buildItem(m) {
  const name = m.id;
  const set = m.settings || {};
  const refs = {};
  refs.name = el("span", { class: "model-id", text: name });
  refs.badge = el("span", { class: "badge" });
  refs.facts = el("div", { class: "muted small-text" });
  refs.verdict = el("div", { class: "small-text" });
  refs.error = el("p", { class: "error small-text", role: "alert" });
  refs.ctx = el("input", { type: "number", min: 256, max: 1048576, step: 256, inputMode: "numeric", value: set.ctx_size ?? "" });
  refs.gpu = el("input", { type: "number", min: 0, max: 999, step: 1, inputMode: "numeric", placeholder: "auto", value: set.gpu_layers ?? "" });
  refs.kv = select(KV_TYPES, set.cache_type_k ?? "f16");
  refs.flash = select(FLASH, flashValue(set.flash_attn));
  refs.parallel = el("input", { type: "number", min: 1, max: 64, step: 1, inputMode: "numeric", value: set.parallel ?? "" });
  refs.rpc = el("input", {
    type: "text",
    placeholder: "HOST:PORT,…",
    pattern: RPC_PATTERN,
    spellcheck: false,
    autocomplete: "off",
    title: "innkeeper workers lending their devices: on loopback (an SSH tunnel) or among serve's --rpc; empty: none",
    value: (set.rpc || []).join(","),
  });
  const form = el(
    "details",
    { class: "load-settings" },
    el("summary", { class: "small-text", text: "Load settings" }),
    el(
      "div",
      { class: "grid2" },
      field("Context size", refs.ctx),
      field("GPU layers", refs.gpu),
      field("KV cache type", refs.kv),
      field("Flash attention", refs.flash),
      field("Parallel slots", refs.parallel),
      field("RPC workers", refs.rpc),
    ),
  );
  refs.load = el("button", { type: "button", class: "btn small primary", text: "Load", "aria-label": `Load ${name}` });
  refs.unload = el("button", { type: "button", class: "btn small", text: "Unload", "aria-label": `Unload ${name}` });
  refs.del = el("button", { type: "button", class: "btn small danger", text: "Delete", "aria-label": `Delete ${name} from the store` });
  // Workers to lend devices: 0 GPU layers (a machine without a GPU) would leave them idle,
  // so the plan picks the layers again (auto), as `serve --rpc` does.
  refs.rpc.addEventListener("input", () => {
    if (refs.rpc.value.trim() && refs.gpu.value.trim() === "0") refs.gpu.value = "";
  });
  refs.load.addEventListener("click", () => load(name, refs));
  refs.unload.addEventListener("click", () => unload(name));
  refs.del.addEventListener("click", () => remove(name));
  const tune = tuneControls(name, el);
  const li = el(
    "li",
    { class: "model-item", "data-id": name },
    el("div", { class: "row between" }, refs.name, refs.badge),
    refs.facts,
    refs.verdict,
    form,
    el("div", { class: "row wrap" }, refs.load, refs.unload, tune.start, tune.cancel, refs.del),
    tune.bar,
    tune.status,
    refs.error,
  );
  return { li, refs };
}

function updateItem({ li, refs }, m) {
  const status = busy.has(m.id) && m.status !== "loading" ? "working" : m.status || "unloaded";
  const isDefault = m.id === list.default || m.is_default;
  li.dataset.status = m.status || "unloaded";
  li.classList.toggle("is-default", !!isDefault);
  refs.name.textContent = (isDefault ? "★ " : "") + m.id;
  refs.name.title = isDefault ? "The default: requests that name no model go here" : "";
  refs.badge.textContent = status;
  refs.badge.className = "badge status-" + status;
  const facts = [m.format, m.quantization, formatBytes(m.size_bytes), m.source === "embedded" ? "built in" : m.source === "store" ? "store" : "folder", m.vision ? "vision" : ""];
  refs.facts.textContent = facts.filter(Boolean).join(" · ");
  const plan = m.plan;
  refs.verdict.textContent = plan?.verdict ? "This machine: " + String(plan.verdict).replace(/_/g, " ") : "";
  refs.verdict.className = "small-text " + (plan?.verdict ? verdictClass(plan) : "");
  refs.error.textContent = m.status === "failed" && m.error ? String(m.error) : "";
  const working = busy.has(m.id) || m.status === "loading";
  refs.load.hidden = m.status === "loaded";
  refs.load.disabled = working;
  refs.load.textContent = m.status === "loading" ? "Loading…" : "Load";
  refs.unload.hidden = m.status !== "loaded";
  refs.unload.disabled = working;
  refs.del.hidden = m.source !== "store" || !m.store_name;
  refs.del.disabled = working;
  updateTune(m.id);
}

function render() {
  const ul = $("model-list");
  const seen = new Set();
  list.models.forEach((m, i) => {
    seen.add(m.id);
    let item = items.get(m.id);
    if (!item) {
      item = buildItem(m);
      items.set(m.id, item);
    }
    updateItem(item, m);
    if (ul.children[i] !== item.li) ul.insertBefore(item.li, ul.children[i] || null);
  });
  for (const [id, item] of items) {
    if (!seen.has(id)) {
      item.li.remove();
      items.delete(id);
    }
  }
  const answering = list.models.find((m) => m.id === list.default);
  $("st-default").textContent = answering ? `${answering.id} (${answering.status})` : list.default || "–";
  $("st-default").hidden = $("st-default-h").hidden = false;
  const loading = list.models.some((m) => m.status === "loading") || busy.size > 0;
  clearTimeout(fastTimer);
  if (loading) fastTimer = setTimeout(refreshModels, FAST_POLL_MS);
}

/** Re-read the list; false when the server has no registry routes (the panel stays hidden). */
export async function refreshModels() {
  if (available === false) return false;
  try {
    list = await getJson("/api/innkeeper/models", { ask: false });
  } catch (err) {
    if (err instanceof ApiError && (err.status === 404 || err.status === 405)) {
      available = false;
      $("models-panel").hidden = true;
    }
    return false;
  }
  const first = available !== true;
  available = true;
  $("models-panel").hidden = false;
  render();
  if (first) refreshTuned(); // which models are tuned: once, then after each tune
  return true;
}

function settingsOf(refs) {
  const out = {};
  const num = (input) => (input.value.trim() === "" ? null : Number(input.value));
  if (num(refs.ctx) !== null) out.ctx_size = num(refs.ctx);
  if (num(refs.gpu) !== null) out.gpu_layers = num(refs.gpu);
  if (num(refs.parallel) !== null) out.parallel = num(refs.parallel);
  out.cache_type_k = out.cache_type_v = refs.kv.value;
  out.flash_attn = refs.flash.value;
  const rpc = refs.rpc.value.trim();
  out.rpc = rpc ? rpc.split(",").map((e) => e.trim()).filter(Boolean) : [];
  return out;
}

async function act(id, what, fn) {
  busy.add(id);
  render();
  const poll = setInterval(refreshModels, FAST_POLL_MS); // live status while the call blocks
  try {
    await fn();
    return true;
  } catch (err) {
    toast(`${what} failed: ${err.message}`);
    return false;
  } finally {
    clearInterval(poll);
    busy.delete(id);
    await refreshModels();
    changed();
  }
}

async function load(id, refs) {
  for (const input of [refs.ctx, refs.gpu, refs.parallel, refs.rpc]) {
    if (!input.checkValidity()) {
      refs.error.textContent = `${input.labels[0].textContent}: ${input.validationMessage}`;
      input.focus();
      return;
    }
  }
  refs.error.textContent = "";
  if (await act(id, `Loading ${id}`, () => postJson("/api/innkeeper/models/load", { model: id, settings: settingsOf(refs) })))
    toast(`${id} is loaded and answers requests`, "info");
}

async function unload(id) {
  const done = async () => {
    await postJson("/api/innkeeper/models/unload", { model: id });
    // Our own unload is the truth at once: a preview due before the status is read again
    // must not load the model back (previews only run while it is loaded).
    if (state.status?.model?.id === id) state.status.model.status = "unloaded";
  };
  if (await act(id, `Unloading ${id}`, done)) toast(`${id} unloaded`, "info");
}

function confirmDelete(name) {
  const dialog = $("confirm-dialog");
  $("confirm-text").textContent = `Delete ${name} and its files from the store? Pulling it again downloads it again.`;
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true });
    dialog.returnValue = "";
    dialog.showModal();
    $("confirm-no").focus();
  });
}

async function remove(id) {
  const m = list.models.find((x) => x.id === id);
  if (!m || !m.store_name) return;
  if (!(await confirmDelete(m.store_name))) return;
  if (await act(id, `Deleting ${m.store_name}`, () => request(`/api/innkeeper/models/${encodeURIComponent(m.store_name)}`, { method: "DELETE" })))
    toast(`Deleted ${m.store_name}`, "info");
}

/* ---------- pulls ---------- */

function showPull(job) {
  const total = job.bytes_total || 0;
  const pct = total ? Math.min(100, Math.floor((100 * job.bytes_done) / total)) : 0;
  $("pull-progress").hidden = false;
  $("pull-fill").style.width = pct + "%";
  $("pull-bar").setAttribute("aria-valuenow", String(pct));
  $("pull-progress").dataset.state = job.state;
  const text = $("pull-text");
  text.classList.toggle("error", job.state === "failed");
  const amount = total ? `${formatBytes(job.bytes_done)} of ${formatBytes(total)} (${pct}%)` : "listing the repo…";
  text.textContent =
    job.state === "running"
      ? `${job.file || job.ref}: ${amount}`
      : job.state === "done"
        ? `Pulled ${job.model}`
        : job.state === "cancelled"
          ? `Cancelled at ${formatBytes(job.bytes_done)}: pulling ${job.ref} again resumes`
          : `Pull failed: ${job.error}`;
  $("pull-cancel").hidden = job.state !== "running";
  $("pull-discard").hidden = !(job.state === "cancelled" && job.model);
  $("pull-discard").dataset.model = job.model || "";
  $("pull-start").disabled = job.state === "running";
}

async function watchPull(id) {
  pullJob = id;
  for (;;) {
    let job;
    try {
      job = await getJson(`/api/innkeeper/pull/${encodeURIComponent(id)}`, { ask: false });
    } catch (err) {
      toast(`Pull status: ${err.message}`);
      $("pull-start").disabled = false;
      break;
    }
    if (pullJob !== id) return;
    showPull(job);
    if (job.state !== "running") {
      if (job.state === "done") {
        toast(`Pulled ${job.model}`, "info");
        await refreshModels();
      }
      break;
    }
    await new Promise((r) => setTimeout(r, PULL_POLL_MS));
  }
  pullJob = null;
}

async function startPull(e) {
  e.preventDefault();
  const ref = $("pull-ref").value.trim();
  if (!ref) {
    $("pull-ref").focus();
    return;
  }
  $("pull-start").disabled = true;
  try {
    const { job } = await postJson("/api/innkeeper/pull", { ref });
    showPull({ state: "running", ref, bytes_done: 0, bytes_total: 0 });
    await watchPull(job);
  } catch (err) {
    showPull({ state: "failed", ref, error: err.message, bytes_done: 0, bytes_total: 0 });
  } finally {
    $("pull-start").disabled = !!pullJob;
  }
}

async function cancelPull() {
  if (!pullJob) return;
  $("pull-cancel").disabled = true;
  try {
    await postJson(`/api/innkeeper/pull/${encodeURIComponent(pullJob)}/cancel`, {});
  } catch (err) {
    toast(`Cancel failed: ${err.message}`);
  } finally {
    $("pull-cancel").disabled = false;
  }
}

async function discardPull() {
  const name = $("pull-discard").dataset.model;
  if (!name || !(await confirmDelete(name + " (partly downloaded)"))) return;
  try {
    await request(`/api/innkeeper/models/${encodeURIComponent(name)}`, { method: "DELETE" });
    $("pull-discard").hidden = true;
    $("pull-text").textContent = `Deleted the partial download of ${name}`;
  } catch (err) {
    toast(`Delete failed: ${err.message}`);
  }
}

/** Wire the panel; `onChanged()` runs after a load or unload (the default may have changed). */
export function initModels(onChanged) {
  changed = onChanged;
  $("pull-form").addEventListener("submit", startPull);
  $("pull-cancel").addEventListener("click", cancelPull);
  $("pull-discard").addEventListener("click", discardPull);
}
