// innkeeper's built-in chat page: the entry point. It wires the modules together, loads the
// stored chats and keeps the server's status fresh. Each module holds one concern:
// state.js (state and preferences), ui.js (DOM helpers), status.js (Server panel),
// keydialog.js (API key), prompt.js (prompt and context bar), chats.js (characters and chats),
// log.js (message log), generate.js (replies and the composer), panels.js (settings panels),
// layout.js (drawers), models.js (Models panel), attach.js (images), cards.js, api.js and
// store.js.

import { loadVision } from "./attach.js";
import { loadStored, selectCharacter, wireChats } from "./chats.js";
import { wireComposer } from "./generate.js";
import { initKeyDialog } from "./keydialog.js";
import { wireLayout } from "./layout.js";
import { initModels, refreshModels } from "./models.js";
import { fillSamplers, renderConnect, wirePanels } from "./panels.js";
import { schedulePreview } from "./prompt.js";
import { DEFAULT_CHAR, modelLoaded, state } from "./state.js";
import { loadTemplates, refreshStatus } from "./status.js";
import { settings } from "./store.js";
import { $ } from "./ui.js";

async function main() {
  initKeyDialog();
  wireComposer();
  wireChats();
  wirePanels();
  wireLayout();
  document.addEventListener("visibilitychange", () => {
    if (!document.hidden) refreshStatus({ ask: false });
  });
  initModels(async () => {
    // a load or unload may change which model answers, and so its template and context
    state.templatesLoaded = false;
    if (await refreshStatus({ ask: false })) await Promise.all([loadTemplates(), loadVision()]);
    schedulePreview();
  });
  fillSamplers();
  renderConnect();
  await loadStored();
  const charId = settings.load("charId", DEFAULT_CHAR.id);
  selectCharacter(state.chars.has(charId) ? charId : DEFAULT_CHAR.id, { chatId: settings.load("chatId", null) });
  if (await refreshStatus()) {
    await Promise.all([loadTemplates(), loadVision()]);
    schedulePreview();
    refreshModels();
  }
  setInterval(() => {
    if (document.hidden || $("key-dialog").open) return;
    const wasLoaded = modelLoaded();
    refreshStatus({ ask: false }).then((ok) => {
      if (ok && modelLoaded() !== wasLoaded) state.templatesLoaded = false; // loaded or unloaded elsewhere
      if (ok && !state.templatesLoaded) loadTemplates().then(schedulePreview);
      if (ok) refreshModels();
    });
  }, 5000);
  $("input").focus({ preventScroll: true });
}

window.innkeeper = { state }; // for debugging from the console
main();
