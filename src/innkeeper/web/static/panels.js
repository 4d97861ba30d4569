// The right drawer's Prompt and Samplers panels (kept in localStorage) and the Connect
// SillyTavern list.

import { renderLog } from "./log.js";
import { renderCtx, schedulePreview } from "./prompt.js";
import { PRESETS, SAMPLER_KEYS, prefs, state } from "./state.js";
import { settings } from "./store.js";
import { $, copyText } from "./ui.js";

export function fillSamplers() {
  for (const k of [...SAMPLER_KEYS, "max_tokens"]) $(k).value = prefs.samplers[k];
  const sel = $("preset");
  sel.replaceChildren();
  for (const [id, p] of Object.entries(PRESETS)) {
    const o = document.createElement("option");
    o.value = id;
    o.textContent = p.label;
    sel.append(o);
  }
  const custom = document.createElement("option");
  custom.value = "custom";
  custom.textContent = "Custom";
  sel.append(custom);
  sel.value = matchingPreset();
}

function matchingPreset() {
  for (const [id, p] of Object.entries(PRESETS)) {
    if (SAMPLER_KEYS.every((k) => Number(prefs.samplers[k]) === p[k])) return id;
  }
  return "custom";
}

export function renderConnect() {
  const base = location.origin;
  const rows = [
    ["KoboldCpp", "Text Completion → API type “KoboldCpp”", base],
    ["Default (Oobabooga)", "Text Completion → API type “Default (Oobabooga)”", base],
    ["OpenAI-compatible", "Chat Completion → “Custom (OpenAI-compatible)”", base + "/v1"],
    ["KoboldAI Classic", "API “KoboldAI Classic”", base + "/api"],
  ];
  const list = $("connect-list");
  list.replaceChildren();
  for (const [api, where, url] of rows) {
    const li = document.createElement("li");
    const name = document.createElement("div");
    name.className = "api";
    name.textContent = api;
    const hint = document.createElement("div");
    hint.className = "where";
    hint.textContent = where;
    const row = document.createElement("div");
    row.className = "row";
    const code = document.createElement("code");
    code.textContent = url;
    const b = document.createElement("button");
    b.type = "button";
    b.className = "btn small";
    b.textContent = "Copy";
    b.setAttribute("aria-label", `Copy the ${api} URL`);
    b.addEventListener("click", () => copyText(url, `the ${api} URL`));
    row.append(code, b);
    li.append(name, hint, row);
    list.append(li);
  }
}

/** The Prompt and Samplers panels: filled from the saved preferences, saved on change. */
export function wirePanels() {
  $("template").addEventListener("change", (e) => {
    prefs.template = e.target.value;
    settings.save("template", prefs.template);
    schedulePreview();
  });
  $("user-name").value = prefs.userName;
  $("user-name").addEventListener("change", (e) => {
    prefs.userName = e.target.value;
    settings.save("userName", prefs.userName);
    renderLog();
    schedulePreview();
  });
  $("system-prompt").value = prefs.systemPrompt;
  $("system-prompt").addEventListener("change", (e) => {
    prefs.systemPrompt = e.target.value;
    settings.save("systemPrompt", prefs.systemPrompt);
    schedulePreview();
  });
  $("show-raw").checked = prefs.showRaw;
  $("raw-panel").hidden = !prefs.showRaw;
  $("show-raw").addEventListener("change", (e) => {
    prefs.showRaw = e.target.checked;
    settings.save("showRaw", prefs.showRaw);
    $("raw-panel").hidden = !prefs.showRaw;
    if (prefs.showRaw && !state.gen) schedulePreview();
  });
  $("copy-raw").addEventListener("click", () => copyText($("raw-prompt").textContent, "the raw prompt"));
  $("preset").addEventListener("change", (e) => {
    const p = PRESETS[e.target.value];
    if (!p) return;
    for (const k of SAMPLER_KEYS) prefs.samplers[k] = p[k];
    settings.save("samplers", prefs.samplers);
    settings.save("preset", e.target.value);
    fillSamplers();
  });
  for (const k of [...SAMPLER_KEYS, "max_tokens"]) {
    $(k).addEventListener("change", (e) => {
      const v = Number(e.target.value);
      const min = Number(e.target.min);
      const max = Number(e.target.max);
      if (e.target.value === "" || !isFinite(v)) {
        e.target.value = prefs.samplers[k];
        return;
      }
      prefs.samplers[k] = Math.min(max, Math.max(min, v));
      e.target.value = prefs.samplers[k];
      settings.save("samplers", prefs.samplers);
      $("preset").value = matchingPreset();
      renderCtx();
    });
  }
}
