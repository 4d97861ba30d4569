// Generating replies: send, regenerate (a new swipe), continue and stop, streamed into the
// log; and the composer's keys and buttons that start them.

import { ApiError, AuthError, request, streamCompletion } from "./api.js";
import { saveChat } from "./chats.js";
import { takePending, wireAttach } from "./attach.js";
import { autosize } from "./layout.js";
import { nearBottom, renderLog } from "./log.js";
import { buildMessages, renderCtx, renderPrompt, scheduleDraftCount, showRaw } from "./prompt.js";
import { msgText, nCtx, prefs, state, userName } from "./state.js";
import { refreshStatus, setHealth } from "./status.js";
import { db, newId } from "./store.js";
import { $, formatText, toast } from "./ui.js";

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
    // Images go as OpenAI image_url parts: the chat route renders the same template with them.
    const seeing = !cont && history.some((h) => h.images?.length);
    const body = seeing
      ? { messages: buildMessages(history, true), instruction_template: prefs.template || undefined, max_tokens: maxTokens, stop, genkey, ...samplerBody() }
      : { prompt: r.prompt, max_tokens: maxTokens, stop, genkey, ...samplerBody() };
    state.lastSent = { ...r, body };
    state.promptTokens = r.tokens;
    renderCtx();
    showRaw(`(sent · ${r.tokens} tokens · ${prefs.template || "model's own"} format)`, r.prompt, `stop: ${JSON.stringify(stop)}`);
    if (gen.stopped) throw new DOMException("stopped", "AbortError");
    final = await streamCompletion(body, {
      signal: controller.signal,
      path: seeing ? "/v1/chat/completions" : undefined,
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
export function stopGeneration() {
  const gen = state.gen;
  if (!gen) return;
  gen.stopped = true;
  gen.controller.abort();
  request("/api/extra/abort", { method: "POST", body: { genkey: gen.genkey } }).catch(() => {});
}

export async function send() {
  if (state.gen || !state.chat) return;
  const input = $("input");
  const text = input.value.replace(/\s+$/, "");
  const msgs = state.chat.messages;
  const images = takePending();
  if (text || images.length) {
    msgs.push({ role: "user", swipes: [text], swipe: 0, meta: [], ...(images.length ? { images } : {}) });
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

export async function regenerate() {
  if (state.gen || !state.chat) return;
  const msgs = state.chat.messages;
  const m = msgs[msgs.length - 1];
  if (!m || m.role !== "assistant") return;
  m.swipes.push("");
  m.swipe = m.swipes.length - 1;
  m.greeting = false;
  await generate(msgs.length - 1, false);
}

export async function continueReply() {
  if (state.gen || !state.chat) return;
  const msgs = state.chat.messages;
  const m = msgs[msgs.length - 1];
  if (!m || m.role !== "assistant") return;
  await generate(msgs.length - 1, true);
}

/** Enter sends, Shift+Enter is a new line, Escape stops; the composer's buttons. */
export function wireComposer() {
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
  wireAttach();
}
