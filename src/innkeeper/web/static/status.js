// The server's state: the health dot, the Server panel, and the prompt formats it offers.

import { AuthError, getJson } from "./api.js";
import { renderCtx } from "./prompt.js";
import { prefs, state } from "./state.js";
import { $, formatBytes, formatCount, verdictClass } from "./ui.js";

export function setHealth(kind, text) {
  const el = $("health");
  el.className = "health " + kind;
  $("health-text").textContent = text;
  el.title = text;
}

export function renderStatus() {
  const s = state.status;
  if (!s) return;
  const m = s.model || {};
  const set = s.settings || {};
  $("model-name").textContent = m.id || "";
  $("st-model").textContent = m.id || "–";
  $("st-format").textContent = [m.format, m.quantization, m.architecture].filter(Boolean).join(" · ") || "–";
  $("st-params").textContent = `${formatCount(m.parameters)} · ${formatBytes(m.size_bytes)}`;
  $("st-ctx").textContent = `${s.context?.size ?? "?"} tokens in use (trained ${m.context_trained ?? "?"})`;
  const plan = s.memory_plan;
  const mem = $("st-memory");
  mem.replaceChildren();
  if (plan && typeof plan === "object") {
    const parts = [
      ["weights", plan.weights_bytes],
      ["KV cache", plan.kv_cache_bytes],
      ["compute", plan.compute_bytes],
      ["overhead", plan.overhead_bytes],
    ].filter(([, v]) => typeof v === "number");
    const total = document.createElement("div");
    total.textContent = `${formatBytes(plan.total_bytes)} total`;
    const detail = document.createElement("div");
    detail.className = "muted";
    detail.textContent = parts.map(([k, v]) => `${k} ${formatBytes(v)}`).join(", ");
    mem.append(total, detail);
    if (plan.verdict) {
      const v = document.createElement("div");
      v.textContent = String(plan.verdict).replace(/_/g, " ");
      v.className = verdictClass(plan);
      mem.append(v);
    }
    for (const note of Array.isArray(plan.notes) ? plan.notes.slice(0, 3) : []) {
      const n = document.createElement("div");
      n.className = "muted small-text";
      n.textContent = String(note);
      mem.append(n);
    }
  } else {
    mem.textContent = "not computed";
  }
  $("st-threads").textContent = `${set.threads ?? "?"}` + (set.threads_batch && set.threads_batch !== set.threads ? ` (batch ${set.threads_batch})` : "");
  $("st-gpu").textContent = `${set.gpu_layers ?? 0}` + (set.flash_attn !== undefined ? ` · flash-attn ${set.flash_attn}` : "") + (set.cache_type_k ? ` · KV ${set.cache_type_k}/${set.cache_type_v}` : "");
  const perf = s.perf || {};
  $("st-slots").textContent = `${perf.busy_slots ?? 0} busy of ${set.parallel ?? "?"}` + (perf.queued ? `, ${perf.queued} queued` : "");
  if (!state.lastReply) {
    $("st-tps").textContent = perf.last_tokens_per_second ? `${perf.last_tokens_per_second} tok/s` : "–";
  }
  $("change-key").hidden = !s.auth_required;
  $("change-key").textContent = "Change API key";
  $("connect-key-note").hidden = !s.auth_required;
  if (!state.gen) setHealth("ok", "ready");
  renderCtx();
}

let asked = 0; // status reads started
let shown = 0; // the newest read whose answer is shown

export async function refreshStatus({ ask = true } = {}) {
  const n = ++asked;
  try {
    const status = await getJson("/api/innkeeper/status", { ask });
    if (n < shown) return true; // a newer answer is already shown: this one is stale
    shown = n;
    state.status = status;
    renderStatus();
    return true;
  } catch (err) {
    if (err instanceof AuthError) {
      setHealth("bad", "API key needed");
      $("change-key").hidden = false;
      $("change-key").textContent = "Enter API key";
    } else setHealth("bad", "server unreachable");
    return false;
  }
}

export async function loadTemplates() {
  try {
    const t = await getJson("/v1/internal/templates");
    const sel = $("template");
    sel.replaceChildren();
    const own = document.createElement("option");
    own.value = "";
    own.textContent = t.has_model_template ? "Model's own template" : `Server default (${t.model})`;
    sel.append(own);
    for (const f of t.builtin || []) {
      const o = document.createElement("option");
      o.value = f.name;
      o.textContent = f.label;
      sel.append(o);
    }
    sel.value = [...sel.options].some((o) => o.value === prefs.template) ? prefs.template : "";
    state.templatesLoaded = true;
  } catch {
    /* the selector keeps "model's own" only */
  }
}
