// The API key dialog: api.js asks through it when the server answers 401, and the Server
// panel's button changes the key.

import { onKeyNeeded, setApiKey } from "./api.js";
import { schedulePreview } from "./prompt.js";
import { loadTemplates, refreshStatus, setHealth } from "./status.js";
import { $ } from "./ui.js";

let keyPrompt = null; // the dialog's answer while it is open: concurrent 401s share it

/** Shows the key dialog; resolves to the key typed, or null when cancelled. */
function askForKey(message) {
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
}

/** Registers the dialog with api.js and wires its buttons: call once, before any request. */
export function initKeyDialog() {
  onKeyNeeded(askForKey);
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
}
