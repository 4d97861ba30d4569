// The prompt: built from the chat and the character's card, rendered by the server
// (/v1/internal/chat-prompt) so the templates live in one place and the raw prompt shown here
// is exactly what is sent; also the context bar and the raw prompt view it drives.

import { postJson } from "./api.js";
import { macros, modelLoaded, msgText, nCtx, prefs, state } from "./state.js";
import { $ } from "./ui.js";

export function renderCtx() {
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

export function showRaw(kind, prompt, extra) {
  $("raw-kind").textContent = kind;
  $("raw-prompt").textContent = prompt;
  $("raw-prompt").dataset.extra = extra || "";
  $("raw-prompt").title = extra || "";
}

/** The chat so far as OpenAI-style messages, the character's card folded into the system
 * message; `withImages`: a message's images as image_url parts after its text. */
export function buildMessages(history, withImages = false) {
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
  for (const m of history) {
    const images = withImages ? m.images || [] : [];
    const content = images.length ? [{ type: "text", text: msgText(m) }, ...images.map((url) => ({ type: "image_url", image_url: { url } }))] : msgText(m);
    messages.push({ role: m.role, content });
  }
  return messages;
}

/**
 * Render the prompt on the server. For `cont`, the last (assistant) message is left open: the
 * rest is rendered with a generation prompt and the unfinished text appended, which works the
 * same for Jinja templates and built-ins.
 */
export async function renderPrompt(messages, cont) {
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
export function schedulePreview() {
  clearTimeout(previewTimer);
  previewTimer = setTimeout(previewPrompt, 120);
}

/** What the next reply's prompt would be: drives the context bar and the raw prompt view.
 * Only while the model is loaded: a preview must not load a model the user unloaded (or that
 * a load refused), so the page shows the truth and its Load button stays the user's. */
async function previewPrompt() {
  if (!state.chat || state.gen) return;
  const seq = ++previewSeq;
  if (!modelLoaded()) {
    state.promptTokens = 0;
    renderCtx();
    showRaw("(the model is not loaded: the preview shows once it is)", "");
    return;
  }
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
export function scheduleDraftCount() {
  clearTimeout(draftTimer);
  draftTimer = setTimeout(async () => {
    const text = $("input").value;
    if (!text || !modelLoaded()) {
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
