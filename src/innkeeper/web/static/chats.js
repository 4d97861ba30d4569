// Characters and chats: the left drawer's lists, new and open chats, importing cards and
// backups (untrusted input: every field is checked), exports, deleting, and browser storage.

import { CardError, normalizeCard, readCardFile, toV2Card } from "./cards.js";
import { stopGeneration } from "./generate.js";
import { closeDrawers } from "./layout.js";
import { messageName, renderLog } from "./log.js";
import { schedulePreview } from "./prompt.js";
import { DEFAULT_CHAR, macros, msgText, state, userName } from "./state.js";
import { db, newId, settings } from "./store.js";
import { $, avatarEl, download, safeName, toast } from "./ui.js";

export function renderCharacter() {
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

export function newChat() {
  const now = Date.now();
  const chat = { id: newId(), charId: state.char.id, title: "", created: now, updated: now, messages: [] };
  const g = greetingMessage(state.char);
  if (g) chat.messages.push(g);
  state.chats.push(chat);
  return chat;
}

export async function saveChat() {
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

export function openChat(chat) {
  if (state.gen) stopGeneration();
  state.chat = chat;
  settings.save("chatId", chat.id);
  renderChatList();
  renderLog();
  schedulePreview();
  closeDrawers();
}

export function selectCharacter(id, { chatId } = {}) {
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

/** The left drawer's buttons. */
export function wireChats() {
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
}

export async function loadStored() {
  try {
    for (const c of await db.all("characters")) if (c && c.id && !c.builtin) state.chars.set(c.id, c);
    state.chats = (await db.all("chats")) || [];
  } catch (err) {
    toast("Browser storage is unavailable; chats will not be kept: " + err.message);
  }
}
