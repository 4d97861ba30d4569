// The message log: each message with its name, text, swipe arrows, edit and delete tools.
// Message text goes in through formatText, which escapes it: never raw HTML.

import { saveChat } from "./chats.js";
import { regenerate } from "./generate.js";
import { schedulePreview } from "./prompt.js";
import { msgText, state, userName } from "./state.js";
import { $, avatarEl, formatText } from "./ui.js";

export function messageName(m) {
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
  if (m.images?.length) {
    const pics = document.createElement("div");
    pics.className = "attachments";
    m.images.forEach((url, i) => {
      const img = document.createElement("img");
      img.src = url;
      img.alt = `${who}'s image ${i + 1}`;
      pics.append(img);
    });
    bubble.append(pics);
  }
  const meta = document.createElement("div");
  meta.className = "meta";
  meta.textContent = metaText(m.meta?.[m.swipe]);
  bubble.append(meta);
  art.append(bubble);
  return art;
}

export function nearBottom() {
  const log = $("log");
  return log.scrollHeight - log.scrollTop - log.clientHeight < 80;
}

export function renderLog() {
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
