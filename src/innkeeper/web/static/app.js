// innkeeper's built-in chat page. The server renders every prompt (/v1/internal/chat-prompt), so
// the templates live in one place and the raw prompt shown here is exactly what is sent.

import { ApiError, AuthError, getJson, onKeyNeeded, postJson, request, setApiKey, streamCompletion } from "./api.js";
import { CardError, applyMacros, normalizeCard, readCardFile, toV2Card } from "./cards.js";
import { initModels, refreshModels } from "./models.js";
import { db, newId, settings } from "./store.js";

const $ = (id) => document.getElementById(id);

const DEFAULT_CHAR = {
  id: "default",
  name: "Assistant",
  description: "A helpful general-purpose assistant. Import a SillyTavern character card to chat with someone else.",
  personality: "",
  scenario: "",
  first_mes: "Hello! I'm your assistant. How can I help you today?",
  mes_example: "",
  system_prompt: "You are a helpful assistant.",
  post_history_instructions: "",
  alternate_greetings: [],
  tags: [],
  avatar: "",
  builtin: true,
};
const DEFAULT_SYSTEM = "Write {{char}}'s next reply in a fictional chat between {{char}} and {{user}}.";

const PRESETS = {
  balanced: { label: "Balanced", temperature: 0.8, top_p: 0.95, top_k: 40, min_p: 0.05, repetition_penalty: 1.1 },
  creative: { label: "Creative", temperature: 1.1, top_p: 1, top_k: 0, min_p: 0.1, repetition_penalty: 1.05 },
  precise: { label: "Precise", temperature: 0.3, top_p: 0.9, top_k: 20, min_p: 0.1, repetition_penalty: 1.05 },
  greedy: { label: "Deterministic (greedy)", temperature: 0, top_p: 1, top_k: 1, min_p: 0, repetition_penalty: 1 },
};
const SAMPLER_KEYS = ["temperature", "top_p", "top_k", "min_p", "repetition_penalty"];

const state = {
  status: null,
  chars: new Map([[DEFAULT_CHAR.id, DEFAULT_CHAR]]),
  chats: [],
  char: DEFAULT_CHAR,
  chat: null,
  gen: null, // {controller, genkey, index, stopped}
  lastSent: null, // {prompt, stop, tokens, template}
  draftTokens: 0,
  promptTokens: 0,
};

const prefs = {
  template: settings.load("template", ""),
  userName: settings.load("userName", "User"),
  systemPrompt: settings.load("systemPrompt", DEFAULT_SYSTEM),
  showRaw: settings.load("showRaw", false),
  preset: settings.load("preset", "balanced"),
  samplers: { ...PRESETS.balanced, max_tokens: 300, ...settings.load("samplers", {}) },
};
delete prefs.samplers.label;

/* ---------- small helpers ---------- */

let toastTimer = 0;
function toast(message, kind = "error") {
  const el = $("toast");
  el.textContent = message;
  el.className = "toast " + kind;
  el.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => (el.hidden = true), kind === "error" ? 6000 : 2500);
}

function formatBytes(n) {
  if (typeof n !== "number" || !isFinite(n)) return "?";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i++;
  }
  return (i ? n.toFixed(n < 10 ? 2 : 1) : n) + " " + units[i];
}

function formatCount(n) {
  if (typeof n !== "number") return "?";
  if (n >= 1e9) return (n / 1e9).toFixed(2) + " B";
  if (n >= 1e6) return Math.round(n / 1e6) + " M";
  return String(n);
}

function escapeHtml(s) {
  return s.replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}

/** Just enough Markdown for chats (code, bold, *actions*), from escaped text: never raw HTML. */
function formatText(text) {
  const parts = escapeHtml(text).split(/```/);
  return parts
    .map((part, i) => {
      if (i % 2 === 1) return "<pre><code>" + part.replace(/^[\w+-]*\n/, "") + "</code></pre>";
      return part
        .replace(/`([^`\n]+)`/g, "<code>$1</code>")
        .replace(/\*\*([^*\n]+)\*\*/g, "<strong>$1</strong>")
        .replace(/\*([^*\n]+)\*/g, "<em>$1</em>");
    })
    .join("");
}

function download(name, data) {
  const blob = new Blob([JSON.stringify(data, null, 2)], { type: "application/json" });
  const a = document.createElement("a");
  a.href = URL.createObjectURL(blob);
  a.download = name;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(a.href), 1000);
}

function safeName(s) {
  return (s || "chat").replace(/[^\w.-]+/g, "_").slice(0, 60);
}

async function copyText(text, what) {
  try {
    await navigator.clipboard.writeText(text);
  } catch {
    // clipboard API needs a secure context; plain http on a LAN address falls back to execCommand
    const ta = document.createElement("textarea");
    ta.value = text;
    ta.setAttribute("readonly", "");
    ta.style.position = "fixed";
    ta.style.opacity = "0";
    document.body.append(ta);
    ta.select();
    document.execCommand("copy");
    ta.remove();
  }
  toast(`Copied ${what}`, "info");
}

function avatarEl(ch, cls) {
  if (ch.avatar) {
    const img = document.createElement("img");
    img.className = "avatar " + cls;
    img.src = ch.avatar;
    img.alt = "";
    img.loading = "lazy";
    return img;
  }
  const div = document.createElement("div");
  div.className = "avatar initial " + cls;
  div.setAttribute("aria-hidden", "true");
  div.textContent = (ch.name || "?").trim().charAt(0).toUpperCase() || "?";
  return div;
}

const userName = () => prefs.userName.trim() || "User";
const macros = (text) => applyMacros(text, state.char.name, userName());
const msgText = (m) => m.swipes[m.swipe] ?? "";
const nCtx = () => state.status?.context?.size || 0;

/* ---------- API key ---------- */

let keyPrompt = null;
onKeyNeeded((message) => {
  if (keyPrompt) return keyPrompt;
  const dialog = $("key-dialog");
  $("key-error").textContent = message;
  $("key-input").value = "";
  keyPrompt = new Promise((resolve) => {
    const done = (value) => {
      dialog.removeEventListener("close", onClose);
      keyPrompt = null;
      resolve(value);
    };
    const onClose = () => done(dialog.returnValue === "ok" ? $("key-input").value.trim() || null : null);
    dialog.addEventListener("close", onClose);
    dialog.showModal();
    $("key-input").focus();
  });
  setHealth("bad", "API key needed");
  return keyPrompt;
});
$("key-form").addEventListener("submit", (e) => {
  e.preventDefault();
  if (!$("key-input").value.trim()) return;
  $("key-dialog").close("ok");
});
$("key-cancel").addEventListener("click", () => $("key-dialog").close("cancel"));
$("change-key").addEventListener("click", async () => {
  setApiKey("");
  if (await refreshStatus()) {
    await loadTemplates();
    schedulePreview();
  }
});

/* ---------- server status ---------- */

function setHealth(kind, text) {
  const el = $("health");
  el.className = "health " + kind;
  $("health-text").textContent = text;
  el.title = text;
}

function renderStatus() {
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
      const code = String(plan.verdict_code || plan.verdict);
      v.textContent = String(plan.verdict).replace(/_/g, " ");
      v.className = plan.fits === false || /swap|not|too/i.test(code) ? "verdict-bad" : /partial|split/i.test(code) ? "verdict-warn" : "verdict-ok";
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

async function refreshStatus({ ask = true } = {}) {
  try {
    state.status = await getJson("/api/innkeeper/status", { ask });
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

async function loadTemplates() {
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

/* ---------- context bar and raw prompt ---------- */

function renderCtx() {
  const ctx = nCtx();
  const used = state.promptTokens + state.draftTokens;
  const bar = $("ctx-bar");
  if (!ctx) {
    $("ctx-text").textContent = "–";
    return;
  }
  const pct = Math.min(100, Math.round((used / ctx) * 100));
  $("ctx-fill").style.width = pct + "%";
  bar.setAttribute("aria-valuenow", String(pct));
  bar.setAttribute("aria-valuetext", `${used} of ${ctx} tokens`);
  bar.classList.toggle("full", used + Number(prefs.samplers.max_tokens || 0) > ctx);
  $("ctx-text").textContent = `${used} / ${ctx} tokens`;
}

function showRaw(kind, prompt, extra) {
  $("raw-kind").textContent = kind;
  $("raw-prompt").textContent = prompt;
  $("raw-prompt").dataset.extra = extra || "";
  $("raw-prompt").title = extra || "";
}

/** The chat so far as OpenAI-style messages, the character's card folded into the system message. */
function buildMessages(history) {
  const ch = state.char;
  const sys = [];
  const base = ch.builtin ? ch.system_prompt : ch.system_prompt ? ch.system_prompt.replace(/\{\{original\}\}/gi, prefs.systemPrompt) : prefs.systemPrompt;
  if (base.trim()) sys.push(base.trim());
  if (ch.description.trim() && !ch.builtin) sys.push(ch.description.trim());
  if (ch.personality.trim()) sys.push(`{{char}}'s personality: ${ch.personality.trim()}`);
  if (ch.scenario.trim()) sys.push(`Scenario: ${ch.scenario.trim()}`);
  if (ch.mes_example.trim()) sys.push("Example dialogue:\n" + ch.mes_example.replace(/<START>\s*/gi, "").trim());
  if (ch.post_history_instructions.trim()) sys.push(ch.post_history_instructions.trim());
  const messages = [];
  if (sys.length) messages.push({ role: "system", content: macros(sys.join("\n\n")) });
  for (const m of history) messages.push({ role: m.role, content: msgText(m) });
  return messages;
}

/**
 * Render the prompt on the server. For `cont`, the last (assistant) message is left open: the
 * rest is rendered with a generation prompt and the unfinished text appended, which works the
 * same for Jinja templates and built-ins.
 */
async function renderPrompt(messages, cont) {
  const template = prefs.template || undefined;
  if (!cont) {
    const r = await postJson("/v1/internal/chat-prompt", { messages, instruction_template: template, add_generation_prompt: true });
    return { prompt: r.prompt, stop: r.stop || [], tokens: r.tokens };
  }
  const last = messages[messages.length - 1];
  const r = await postJson("/v1/internal/chat-prompt", { messages: messages.slice(0, -1), instruction_template: template, add_generation_prompt: true });
  const prompt = r.prompt + last.content;
  const count = await postJson("/api/extra/tokencount", { prompt });
  return { prompt, stop: r.stop || [], tokens: count.value };
}

let previewTimer = 0;
let previewSeq = 0;
function schedulePreview() {
  clearTimeout(previewTimer);
  previewTimer = setTimeout(previewPrompt, 120);
}

/** What the next reply's prompt would be: drives the context bar and the raw prompt view. */
async function previewPrompt() {
  if (!state.chat || state.gen) return;
  const seq = ++previewSeq;
  try {
    const history = state.chat.messages;
    const r = await renderPrompt(buildMessages(history), false);
    if (seq !== previewSeq || state.gen) return;
    state.promptTokens = r.tokens;
    renderCtx();
    showRaw("(the chat so far, as the model will see it)", r.prompt, `${r.tokens} tokens`);
  } catch (err) {
    if (seq === previewSeq) showRaw("(preview failed)", String(err.message || err));
  }
}

let draftTimer = 0;
function scheduleDraftCount() {
  clearTimeout(draftTimer);
  draftTimer = setTimeout(async () => {
    const text = $("input").value;
    if (!text) {
      state.draftTokens = 0;
      renderCtx();
      return;
    }
    try {
      const r = await postJson("/api/extra/tokencount", { prompt: text });
      state.draftTokens = r.value;
      renderCtx();
    } catch {
      /* the bar just misses the draft */
    }
  }, 300);
}

/* ---------- characters and chats ---------- */

function renderCharacter() {
  const ch = state.char;
  $("char-name").textContent = ch.name;
  const img = $("char-avatar");
  if (ch.avatar) {
    img.src = ch.avatar;
    img.alt = `${ch.name}'s avatar`;
    img.hidden = false;
    $("char-initial").hidden = true;
  } else {
    img.hidden = true;
    img.removeAttribute("src");
    $("char-initial").hidden = false;
    $("char-initial").textContent = ch.name.charAt(0).toUpperCase();
  }
  $("char-description").textContent = macros(ch.description) || "—";
  $("char-first").textContent = macros(ch.first_mes) || "—";
  $("delete-char").disabled = !!ch.builtin;
  $("export-card").disabled = !!ch.builtin;
  const list = $("char-list");
  list.replaceChildren();
  const chars = [...state.chars.values()].sort((a, b) => (a.builtin ? -1 : b.builtin ? 1 : a.name.localeCompare(b.name)));
  for (const c of chars) {
    const li = document.createElement("li");
    const b = document.createElement("button");
    b.type = "button";
    b.dataset.id = c.id;
    b.setAttribute("aria-current", String(c.id === ch.id));
    b.setAttribute("aria-label", `Chat with ${c.name}`);
    const label = document.createElement("span");
    label.className = "label";
    label.textContent = c.name;
    b.append(avatarEl(c, ""), label);
    b.addEventListener("click", () => selectCharacter(c.id));
    li.append(b);
    list.append(li);
  }
}

function renderChatList() {
  const list = $("chat-list");
  list.replaceChildren();
  const chats = state.chats.filter((c) => c.charId === state.char.id).sort((a, b) => b.updated - a.updated);
  for (const c of chats) {
    const li = document.createElement("li");
    const b = document.createElement("button");
    b.type = "button";
    b.setAttribute("aria-current", String(state.chat && c.id === state.chat.id));
    const label = document.createElement("span");
    label.className = "label";
    label.textContent = c.title || "New chat";
    const sub = document.createElement("span");
    sub.className = "sub";
    sub.textContent = new Date(c.updated).toLocaleString([], { month: "short", day: "numeric", hour: "2-digit", minute: "2-digit" });
    b.append(label, sub);
    b.setAttribute("aria-label", `Open chat: ${c.title || "New chat"}, ${sub.textContent}`);
    b.addEventListener("click", () => openChat(c));
    li.append(b);
    list.append(li);
  }
}

function greetingMessage(ch) {
  const greetings = [ch.first_mes, ...(ch.alternate_greetings || [])].filter((g) => g && g.trim());
  if (!greetings.length) return null;
  return { role: "assistant", swipes: greetings.map(macros), swipe: 0, meta: [], greeting: true };
}

function newChat() {
  const now = Date.now();
  const chat = { id: newId(), charId: state.char.id, title: "", created: now, updated: now, messages: [] };
  const g = greetingMessage(state.char);
  if (g) chat.messages.push(g);
  state.chats.push(chat);
  return chat;
}

async function saveChat() {
  const chat = state.chat;
  if (!chat) return;
  chat.updated = Date.now();
  const firstUser = chat.messages.find((m) => m.role === "user");
  if (firstUser && !chat.title) chat.title = msgText(firstUser).slice(0, 60);
  try {
    await db.put("chats", JSON.parse(JSON.stringify(chat)));
  } catch (err) {
    toast("Could not save the chat: " + err.message);
  }
  renderChatList();
}

function openChat(chat) {
  if (state.gen) stopGeneration();
  state.chat = chat;
  settings.save("chatId", chat.id);
  renderChatList();
  renderLog();
  schedulePreview();
  closeDrawers();
}

function selectCharacter(id, { chatId } = {}) {
  const ch = state.chars.get(id) || DEFAULT_CHAR;
  if (state.gen) stopGeneration();
  state.char = ch;
  settings.save("charId", ch.id);
  renderCharacter();
  const chats = state.chats.filter((c) => c.charId === ch.id).sort((a, b) => b.updated - a.updated);
  const chat = chats.find((c) => c.id === chatId) || chats[0];
  if (chat) openChat(chat);
  else {
    openChat(newChat());
    saveChat();
  }
}

async function importFile(file) {
  let result;
  try {
    result = await readCardFile(file);
  } catch (err) {
    toast(err instanceof CardError ? `Cannot import ${file.name}: ${err.message}` : `Cannot import ${file.name}: ${err}`);
    return;
  }
  if (result.kind === "backup") return restoreBackup(result.backup);
  const ch = { id: newId(), ...result.card, avatar: result.avatar, imported: Date.now() };
  state.chars.set(ch.id, ch);
  await db.put("characters", ch);
  selectCharacter(ch.id);
  toast(`Imported ${ch.name}`, "info");
}

/** A character from a backup file, every field checked: backups are untrusted input too. */
function cleanCharacter(c) {
  if (!c || typeof c.id !== "string" || c.builtin || c.id === DEFAULT_CHAR.id) return null;
  let card;
  try {
    card = normalizeCard(c);
  } catch {
    return null;
  }
  const avatar = typeof c.avatar === "string" && c.avatar.startsWith("data:image/") ? c.avatar : "";
  return { id: c.id, ...card, avatar, imported: Number(c.imported) || Date.now() };
}

function cleanChat(c) {
  if (!c || typeof c.id !== "string" || typeof c.charId !== "string" || !Array.isArray(c.messages)) return null;
  const messages = [];
  for (const m of c.messages) {
    if (!m || (m.role !== "user" && m.role !== "assistant")) continue;
    const swipes = Array.isArray(m.swipes) ? m.swipes.filter((x) => typeof x === "string") : [String(m.content ?? "")];
    if (!swipes.length) continue;
    const swipe = Number.isInteger(m.swipe) && m.swipe >= 0 && m.swipe < swipes.length ? m.swipe : 0;
    messages.push({ role: m.role, swipes, swipe, meta: [], greeting: !!m.greeting });
  }
  const now = Date.now();
  return {
    id: c.id,
    charId: c.charId,
    title: typeof c.title === "string" ? c.title.slice(0, 200) : "",
    created: Number(c.created) || now,
    updated: Number(c.updated) || now,
    messages,
  };
}

async function restoreBackup(backup) {
  let nChars = 0;
  let nChats = 0;
  for (const raw of backup.characters || []) {
    const c = cleanCharacter(raw);
    if (!c) continue;
    state.chars.set(c.id, c);
    await db.put("characters", c);
    nChars++;
  }
  for (const raw of backup.chats || []) {
    const c = cleanChat(raw);
    if (!c || !state.chars.has(c.charId)) continue;
    state.chats = state.chats.filter((x) => x.id !== c.id).concat([c]);
    await db.put("chats", c);
    nChats++;
  }
  renderCharacter();
  renderChatList();
  toast(`Restored ${nChars} characters and ${nChats} chats`, "info");
}

async function deleteCharacter() {
  const ch = state.char;
  if (ch.builtin || !confirm(`Delete ${ch.name} and all chats with them?`)) return;
  for (const c of state.chats.filter((x) => x.charId === ch.id)) await db.del("chats", c.id);
  state.chats = state.chats.filter((x) => x.charId !== ch.id);
  state.chars.delete(ch.id);
  await db.del("characters", ch.id);
  selectCharacter(DEFAULT_CHAR.id);
}

async function deleteChat() {
  const chat = state.chat;
  if (!chat || !confirm("Delete this chat?")) return;
  state.chats = state.chats.filter((c) => c.id !== chat.id);
  await db.del("chats", chat.id);
  selectCharacter(state.char.id);
}

/* ---------- the message log ---------- */

function messageName(m) {
  return m.role === "user" ? userName() : state.char.name;
}

function metaText(meta) {
  if (!meta) return "";
  const bits = [];
  if (meta.tps) bits.push(`${meta.tps.toFixed(1)} tok/s`);
  if (meta.tokens) bits.push(`${meta.tokens} tokens`);
  if (meta.finish === "stopped") bits.push("stopped");
  else if (meta.finish === "length") bits.push("hit the token limit");
  else if (meta.finish === "error") bits.push("failed");
  return bits.join(" · ");
}

function tool(label, text, onClick, disabled = false) {
  const b = document.createElement("button");
  b.type = "button";
  b.className = "tool";
  b.textContent = text;
  b.setAttribute("aria-label", label);
  b.title = label;
  b.disabled = disabled;
  b.addEventListener("click", onClick);
  return b;
}

function messageEl(m, index) {
  const last = index === state.chat.messages.length - 1;
  const busy = !!state.gen;
  const art = document.createElement("article");
  art.className = "msg " + m.role;
  art.dataset.index = String(index);
  const who = messageName(m);
  art.setAttribute("aria-label", `${who} says`);
  art.append(m.role === "user" ? avatarEl({ name: who }, "") : avatarEl(state.char, ""));

  const bubble = document.createElement("div");
  bubble.className = "bubble";
  const head = document.createElement("div");
  head.className = "head";
  const name = document.createElement("span");
  name.className = "who";
  name.textContent = who;
  head.append(name);
  const tools = document.createElement("div");
  tools.className = "tools";
  if (m.role === "assistant" && last && (m.swipes.length > 1 || !m.greeting)) {
    const sw = document.createElement("span");
    sw.className = "swipes";
    const count = document.createElement("span");
    count.className = "swipe-count";
    count.textContent = `${m.swipe + 1}/${m.swipes.length}`;
    count.setAttribute("aria-label", `Reply ${m.swipe + 1} of ${m.swipes.length}`);
    sw.append(
      tool("Previous reply", "‹", () => swipe(-1), busy || m.swipe === 0),
      count,
      tool("Next reply (generates a new one after the last)", "›", () => swipe(1), busy),
    );
    tools.append(sw);
  }
  tools.append(tool(`Edit ${who}'s message`, "Edit", () => editMessage(index), busy));
  tools.append(tool(`Delete ${who}'s message`, "✕", () => deleteMessage(index), busy));
  head.append(tools);

  const text = document.createElement("div");
  text.className = "text";
  text.innerHTML = formatText(msgText(m));
  bubble.append(head, text);
  const meta = document.createElement("div");
  meta.className = "meta";
  meta.textContent = metaText(m.meta?.[m.swipe]);
  bubble.append(meta);
  art.append(bubble);
  return art;
}

function nearBottom() {
  const log = $("log");
  return log.scrollHeight - log.scrollTop - log.clientHeight < 80;
}

function renderLog() {
  const log = $("log");
  log.replaceChildren();
  const msgs = state.chat?.messages || [];
  if (!msgs.length) {
    const p = document.createElement("p");
    p.className = "empty-note";
    p.textContent = `Say hello to ${state.char.name}.`;
    log.append(p);
  }
  msgs.forEach((m, i) => log.append(messageEl(m, i)));
  log.scrollTop = log.scrollHeight;
  updateButtons();
}

function updateButtons() {
  const busy = !!state.gen;
  const msgs = state.chat?.messages || [];
  const last = msgs[msgs.length - 1];
  $("send").hidden = busy;
  $("stop").hidden = !busy;
  $("regen").disabled = busy || !last || last.role !== "assistant";
  $("continue").disabled = busy || !last || last.role !== "assistant";
  $("new-chat").disabled = busy;
}

function editMessage(index) {
  const m = state.chat.messages[index];
  const art = $("log").querySelector(`.msg[data-index="${index}"]`);
  if (!art) return;
  const textEl = art.querySelector(".text");
  const box = document.createElement("textarea");
  box.className = "edit-box";
  box.value = msgText(m);
  box.setAttribute("aria-label", "Edit message text");
  const row = document.createElement("div");
  row.className = "row end";
  const cancel = document.createElement("button");
  cancel.type = "button";
  cancel.className = "btn small";
  cancel.textContent = "Cancel";
  const save = document.createElement("button");
  save.type = "button";
  save.className = "btn small primary";
  save.textContent = "Save";
  row.append(cancel, save);
  textEl.replaceWith(box);
  art.querySelector(".meta").replaceWith(row);
  const commit = async () => {
    m.swipes[m.swipe] = box.value;
    renderLog();
    schedulePreview();
    await saveChat();
  };
  save.addEventListener("click", commit);
  cancel.addEventListener("click", renderLog);
  box.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) {
      e.preventDefault();
      commit();
    } else if (e.key === "Escape") renderLog();
  });
  box.focus();
}

async function deleteMessage(index) {
  state.chat.messages.splice(index, 1);
  renderLog();
  schedulePreview();
  await saveChat();
}

async function swipe(dir) {
  const msgs = state.chat.messages;
  const m = msgs[msgs.length - 1];
  if (!m || m.role !== "assistant" || state.gen) return;
  const next = m.swipe + dir;
  if (next < 0) return;
  if (next >= m.swipes.length) return regenerate();
  m.swipe = next;
  renderLog();
  schedulePreview();
  await saveChat();
}

/* ---------- generation ---------- */

function samplerBody() {
  const s = prefs.samplers;
  return {
    temperature: Number(s.temperature),
    top_p: Number(s.top_p),
    top_k: Math.round(Number(s.top_k)),
    min_p: Number(s.min_p),
    repetition_penalty: Number(s.repetition_penalty),
  };
}

let generated = 0; // replies finished and saved, on <body data-generated> so tests can wait for one

/**
 * Generate into chat.messages[index] (an assistant message): a fresh swipe, or with `cont` the
 * end of its current swipe. Older messages are dropped from the prompt when the context is full.
 */
async function generate(index, cont) {
  const chat = state.chat;
  const m = chat.messages[index];
  const controller = new AbortController();
  const genkey = "ik-" + newId();
  const gen = { controller, genkey, index, stopped: false, chat };
  state.gen = gen;
  setHealth("busy", "generating…");
  renderLog();
  $("log").querySelector(`.msg[data-index="${index}"]`)?.classList.add("streaming");
  let pending = false;
  let lastPaint = 0;
  const paint = () => {
    pending = false;
    lastPaint = performance.now();
    const textEl = $("log").querySelector(`.msg[data-index="${index}"] .text`);
    if (!textEl || chat !== state.chat) return;
    const stick = nearBottom();
    textEl.innerHTML = formatText(msgText(m));
    if (stick) $("log").scrollTop = $("log").scrollHeight;
  };
  const started = performance.now();
  let pieces = 0;
  let finish = "stop";
  let final = null;
  try {
    const maxWanted = Math.max(1, Math.round(Number(prefs.samplers.max_tokens) || 300));
    const ctx = nCtx() || 2048;
    let history = chat.messages.slice(0, cont ? index + 1 : index);
    let r = await renderPrompt(buildMessages(history), cont);
    // Drop the oldest turns (keeping the greeting's place) until the prompt and the reply fit.
    while (r.tokens + Math.min(maxWanted, ctx / 4) > ctx && history.length > 1) {
      history = history.slice(1);
      r = await renderPrompt(buildMessages(history), cont);
    }
    const maxTokens = Math.min(maxWanted, ctx - r.tokens - 1);
    if (maxTokens < 1) throw new ApiError(`the prompt (${r.tokens} tokens) fills the whole context (${ctx})`);
    const stop = [...new Set([...(r.stop || []), `\n${userName()}:`])];
    const body = { prompt: r.prompt, max_tokens: maxTokens, stop, genkey, ...samplerBody() };
    state.lastSent = { ...r, body };
    state.promptTokens = r.tokens;
    renderCtx();
    showRaw(`(sent · ${r.tokens} tokens · ${prefs.template || "model's own"} format)`, r.prompt, `stop: ${JSON.stringify(stop)}`);
    if (gen.stopped) throw new DOMException("stopped", "AbortError");
    final = await streamCompletion(body, {
      signal: controller.signal,
      onText: (piece) => {
        if (!cont && !pieces) piece = piece.replace(/^\s+/, "");
        pieces++;
        m.swipes[m.swipe] += piece;
        if (!pending) {
          // at most ~25 repaints a second: re-rendering the message per token costs CPU the
          // server (often on the same machine) needs more
          pending = true;
          setTimeout(() => requestAnimationFrame(paint), Math.max(0, lastPaint + 40 - performance.now()));
        }
      },
    });
    finish = final?.finish_reason || "stop";
  } catch (err) {
    if (err.name === "AbortError" || gen.stopped) finish = "stopped";
    else {
      finish = "error";
      toast(err instanceof AuthError ? err.message : `Generation failed: ${err.message || err}`);
    }
  } finally {
    if (state.gen === gen) state.gen = null;
  }
  const seconds = (performance.now() - started) / 1000;
  const tokens = final?.usage?.completion_tokens ?? pieces;
  const tps = final?.timings?.predicted_per_second ?? (seconds > 0 ? pieces / seconds : 0);
  m.swipes[m.swipe] = msgText(m).replace(/\s+$/, "");
  m.meta = m.meta || [];
  m.meta[m.swipe] = { tps, tokens, finish, at: Date.now() };
  if (final?.usage) state.promptTokens = final.usage.prompt_tokens + final.usage.completion_tokens;
  state.lastReply = { tps, tokens };
  $("st-tps").textContent = tps ? `${tps.toFixed(1)} tok/s · ${tokens} tokens` + (finish === "stopped" ? " (stopped)" : "") : "–";
  if ((finish === "error" || finish === "stopped") && !msgText(m) && !cont) {
    m.swipes.splice(m.swipe, 1);
    m.meta.splice(m.swipe, 1);
    if (!m.swipes.length) chat.messages.splice(index, 1);
    else m.swipe = m.swipes.length - 1;
  }
  if (chat === state.chat) {
    await saveChat();
    renderLog();
    setHealth("ok", finish === "stopped" ? "stopped" : "ready");
    refreshStatus();
    renderCtx();
    $("log").scrollTop = $("log").scrollHeight;
  } else {
    await db.put("chats", JSON.parse(JSON.stringify(chat)));
  }
  generated++;
  document.body.dataset.generated = String(generated);
}

/** Stop the reply: close the stream and tell the server, which frees the slot at once. */
function stopGeneration() {
  const gen = state.gen;
  if (!gen) return;
  gen.stopped = true;
  gen.controller.abort();
  request("/api/extra/abort", { method: "POST", body: { genkey: gen.genkey } }).catch(() => {});
}

async function send() {
  if (state.gen || !state.chat) return;
  const input = $("input");
  const text = input.value.replace(/\s+$/, "");
  const msgs = state.chat.messages;
  if (text) {
    msgs.push({ role: "user", swipes: [text], swipe: 0, meta: [] });
    input.value = "";
    autosize();
    state.draftTokens = 0;
  } else if (!msgs.length || msgs[msgs.length - 1].role !== "user") {
    input.focus();
    return;
  }
  msgs.push({ role: "assistant", swipes: [""], swipe: 0, meta: [] });
  saveChat();
  await generate(msgs.length - 1, false);
}

async function regenerate() {
  if (state.gen || !state.chat) return;
  const msgs = state.chat.messages;
  const m = msgs[msgs.length - 1];
  if (!m || m.role !== "assistant") return;
  m.swipes.push("");
  m.swipe = m.swipes.length - 1;
  m.greeting = false;
  await generate(msgs.length - 1, false);
}

async function continueReply() {
  if (state.gen || !state.chat) return;
  const msgs = state.chat.messages;
  const m = msgs[msgs.length - 1];
  if (!m || m.role !== "assistant") return;
  await generate(msgs.length - 1, true);
}

/* ---------- settings panels ---------- */

function fillSamplers() {
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

function renderConnect() {
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

function autosize() {
  const ta = $("input");
  ta.style.height = "auto";
  ta.style.height = Math.min(ta.scrollHeight + 2, window.innerHeight * 0.4) + "px";
}

function closeDrawers() {
  for (const id of ["left", "right"]) {
    $(id).classList.remove("open");
    $("toggle-" + id).setAttribute("aria-expanded", "false");
  }
  $("backdrop").hidden = true;
}

function toggleDrawer(id) {
  const open = !$(id).classList.contains("open");
  closeDrawers();
  if (open) {
    $(id).classList.add("open");
    $("toggle-" + id).setAttribute("aria-expanded", "true");
    $("backdrop").hidden = false;
  }
}

function wire() {
  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    send();
  });
  $("input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      send();
    }
  });
  $("input").addEventListener("input", () => {
    autosize();
    scheduleDraftCount();
  });
  document.addEventListener("keydown", (e) => {
    if (e.key === "Escape" && state.gen) stopGeneration();
  });
  $("stop").addEventListener("click", stopGeneration);
  $("regen").addEventListener("click", regenerate);
  $("continue").addEventListener("click", continueReply);
  $("new-chat").addEventListener("click", () => {
    openChat(newChat());
    saveChat();
  });
  $("card-file").addEventListener("change", async (e) => {
    for (const f of e.target.files) await importFile(f);
    e.target.value = "";
  });
  $("export-card").addEventListener("click", () => download(safeName(state.char.name) + ".card.json", toV2Card(state.char)));
  $("delete-char").addEventListener("click", deleteCharacter);
  $("delete-chat").addEventListener("click", deleteChat);
  $("export-chat").addEventListener("click", () => {
    const c = state.chat;
    download(`${safeName(state.char.name)}-${safeName(c.title)}.chat.json`, {
      app: "innkeeper",
      character: state.char.name,
      user: userName(),
      ...c,
      messages: c.messages.map((m) => ({ role: m.role, name: messageName(m), content: msgText(m), swipes: m.swipes })),
    });
  });
  $("export-all").addEventListener("click", () =>
    download(`innkeeper-backup-${new Date().toISOString().slice(0, 10)}.json`, {
      app: "innkeeper",
      version: 1,
      exported: new Date().toISOString(),
      characters: [...state.chars.values()].filter((c) => !c.builtin),
      chats: state.chats,
    }),
  );
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
  $("toggle-left").addEventListener("click", () => toggleDrawer("left"));
  $("toggle-right").addEventListener("click", () => toggleDrawer("right"));
  $("backdrop").addEventListener("click", closeDrawers);
  document.addEventListener("visibilitychange", () => {
    if (!document.hidden) refreshStatus({ ask: false });
  });
}

async function loadStored() {
  try {
    for (const c of await db.all("characters")) if (c && c.id && !c.builtin) state.chars.set(c.id, c);
    state.chats = (await db.all("chats")) || [];
  } catch (err) {
    toast("Browser storage is unavailable; chats will not be kept: " + err.message);
  }
}

async function main() {
  wire();
  initModels({
    toast,
    formatBytes,
    changed: async () => {
      // a load or unload may change which model answers, and so its template and context
      state.templatesLoaded = false;
      if (await refreshStatus({ ask: false })) await loadTemplates();
      schedulePreview();
    },
  });
  fillSamplers();
  renderConnect();
  await loadStored();
  const charId = settings.load("charId", DEFAULT_CHAR.id);
  selectCharacter(state.chars.has(charId) ? charId : DEFAULT_CHAR.id, { chatId: settings.load("chatId", null) });
  if (await refreshStatus()) {
    await loadTemplates();
    schedulePreview();
    refreshModels();
  }
  setInterval(() => {
    if (document.hidden || $("key-dialog").open) return;
    refreshStatus({ ask: false }).then((ok) => {
      if (ok && !state.templatesLoaded) loadTemplates().then(schedulePreview);
      if (ok) refreshModels();
    });
  }, 5000);
  $("input").focus({ preventScroll: true });
}

window.innkeeper = { state }; // for debugging from the console
main();
