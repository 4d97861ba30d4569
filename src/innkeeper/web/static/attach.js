// Images in the composer: shown only when the model can see (/props modalities.vision); the
// images picked are held as data: URLs until the message is sent, then kept on the message
// and sent as OpenAI image_url parts (generate.js).

import { getJson } from "./api.js";
import { state } from "./state.js";
import { $ } from "./ui.js";

state.pendingImages = [];

/** Ask the server whether the model answering takes images; hide the button when not. */
export async function loadVision() {
  try {
    const props = await getJson("/props", { ask: false });
    state.vision = !!props?.modalities?.vision;
  } catch {
    state.vision = false;
  }
  $("attach").hidden = !state.vision;
  if (!state.vision) clearPending();
}

/** The images picked for the next message (and forgets them). */
export function takePending() {
  const images = state.pendingImages;
  clearPending();
  return images;
}

function clearPending() {
  state.pendingImages = [];
  renderPending();
}

function renderPending() {
  const box = $("attachments");
  box.replaceChildren();
  box.hidden = !state.pendingImages.length;
  state.pendingImages.forEach((url, i) => {
    const b = document.createElement("button");
    b.type = "button";
    b.className = "thumb";
    b.title = "Remove this image";
    b.setAttribute("aria-label", `Remove image ${i + 1}`);
    const img = document.createElement("img");
    img.src = url;
    img.alt = `attached image ${i + 1}`;
    b.append(img);
    b.addEventListener("click", () => {
      state.pendingImages.splice(i, 1);
      renderPending();
    });
    box.append(b);
  });
}

const readAsDataUrl = (file) =>
  new Promise((resolve, reject) => {
    const r = new FileReader();
    r.onload = () => resolve(String(r.result));
    r.onerror = () => reject(r.error);
    r.readAsDataURL(file);
  });

/** The Attach button opens the file picker; picked images wait beside the composer. */
export function wireAttach() {
  const input = $("attach-file");
  $("attach").addEventListener("click", () => input.click());
  input.addEventListener("change", async () => {
    for (const f of input.files || []) {
      if (f.type.startsWith("image/")) state.pendingImages.push(await readAsDataUrl(f));
    }
    input.value = "";
    renderPending();
  });
}
