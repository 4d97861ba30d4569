// "Tune" in the Models panel: runs `innkeeper tune` on the server (an admin action) for one
// model, with live progress and a Cancel, and says which models have a tuned profile. The
// profile is used the next time `innkeeper serve` starts with that model. One tune at a time.
// Text goes in with textContent only.

import { getJson, postJson } from "./api.js";
import { toast } from "./ui.js";

const POLL_MS = 700;

let tuned = {}; // model id -> {used, reason, flags}: the models with a profile
let job = null; // the tune this page watches: {id, model, progress, current, state}
const views = new Map(); // model id -> the refs of its tune controls

/** The tune controls of one model item (`el` is the panel's element helper). */
export function tuneControls(id, el) {
  const refs = {};
  refs.status = el("div", { class: "small-text muted tune-status", role: "status", "aria-live": "polite" });
  refs.fill = el("div", { class: "fill" });
  refs.bar = el("div", { class: "bar tune-bar", role: "progressbar", "aria-label": `Tuning ${id}`, "aria-valuemin": "0", "aria-valuemax": "100", "aria-valuenow": "0" }, refs.fill);
  refs.bar.hidden = true;
  refs.start = el("button", {
    type: "button",
    class: "btn small",
    text: "Tune",
    title: "Measure which settings run this model fastest on this machine (about 90 s; the server is slower meanwhile)",
    "aria-label": `Tune ${id}`,
  });
  refs.cancel = el("button", { type: "button", class: "btn small danger", text: "Cancel tune", "aria-label": `Cancel tuning ${id}` });
  refs.cancel.hidden = true;
  refs.start.addEventListener("click", () => start(id));
  refs.cancel.addEventListener("click", cancel);
  views.set(id, refs);
  return refs;
}

function pct(x) {
  return `${Math.round((x || 0) * 100)}%`;
}

/** Show `id`'s tune state: running (progress, the setting last tried), tuned, or nothing. */
export function updateTune(id) {
  const refs = views.get(id);
  if (!refs) return;
  const mine = job && job.model === id && job.state === "running";
  refs.bar.hidden = !mine;
  refs.cancel.hidden = !mine;
  refs.start.hidden = mine;
  refs.start.disabled = !!(job && job.state === "running");
  if (mine) {
    refs.fill.style.width = pct(job.progress);
    refs.bar.setAttribute("aria-valuenow", String(Math.round((job.progress || 0) * 100)));
    refs.status.textContent = `Tuning… ${pct(job.progress)} of the budget · last tried: ${job.current}`;
    return;
  }
  const t = tuned[id];
  if (!t) refs.status.textContent = "";
  else if (t.used && !Object.keys(t.settings || {}).length) refs.status.textContent = "Tuned: serve's defaults are the fastest here";
  else if (t.used) refs.status.textContent = `Tuned: ${t.flags} (used when serve starts with it)`;
  else refs.status.textContent = `Tuned profile not used here: ${t.reason}`;
}

function updateAll() {
  for (const id of views.keys()) updateTune(id);
}

/** Re-read which models are tuned (admin only: quietly nothing for other callers). */
export async function refreshTuned() {
  try {
    tuned = (await getJson("/api/innkeeper/tune", { ask: false })).models || {};
  } catch {
    tuned = {};
  }
  updateAll();
}

async function start(id) {
  if (job && job.state === "running") return;
  try {
    const state = await postJson("/api/innkeeper/tune", { model: id });
    job = { ...state, id: state.job };
  } catch (err) {
    toast(`Tune failed to start: ${err.message}`);
    return;
  }
  updateAll();
  await watch();
}

async function watch() {
  const id = job.id;
  for (;;) {
    await new Promise((r) => setTimeout(r, POLL_MS));
    let state;
    try {
      state = await getJson(`/api/innkeeper/tune/${encodeURIComponent(id)}`, { ask: false });
    } catch (err) {
      toast(`Tune status: ${err.message}`);
      job = null;
      break;
    }
    job = { ...state, id };
    updateAll();
    if (state.state !== "running") {
      report(state);
      job = null;
      break;
    }
  }
  await refreshTuned();
}

function report(state) {
  if (state.state === "cancelled") toast(`Tuning ${state.model} cancelled: nothing saved`, "info");
  else if (state.state === "failed") toast(`Tuning ${state.model} failed: ${state.error}`);
  else {
    const r = state.result;
    const gain = (g) => (g ? `${g >= 1 ? "+" : ""}${Math.round((g - 1) * 100)}%` : "–");
    if (!Object.keys(r.winner.settings).length) toast(`Tuned ${state.model}: serve's defaults are the fastest here`, "info");
    else toast(`Tuned ${state.model}: ${r.winner.flags} (prompt ${gain(r.gain.prompt)}, decode ${gain(r.gain.decode)}); used when serve next starts with it`, "info");
  }
}

async function cancel() {
  if (!job) return;
  try {
    await postJson(`/api/innkeeper/tune/${encodeURIComponent(job.id)}/cancel`, {});
  } catch (err) {
    toast(`Cancel failed: ${err.message}`);
  }
}
