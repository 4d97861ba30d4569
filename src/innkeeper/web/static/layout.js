// The page's layout: the drawers (side panels that slide over the chat on a phone) and the
// composer's growing text box.

import { $ } from "./ui.js";

export function autosize() {
  const ta = $("input");
  ta.style.height = "auto";
  ta.style.height = Math.min(ta.scrollHeight + 2, window.innerHeight * 0.4) + "px";
}

export function closeDrawers() {
  for (const id of ["left", "right"]) {
    $(id).classList.remove("open");
    $("toggle-" + id).setAttribute("aria-expanded", "false");
  }
  $("backdrop").hidden = true;
}

export function toggleDrawer(id) {
  const open = !$(id).classList.contains("open");
  closeDrawers();
  if (open) {
    $(id).classList.add("open");
    $("toggle-" + id).setAttribute("aria-expanded", "true");
    $("backdrop").hidden = false;
  }
}

/** The drawer toggles and the backdrop that closes them. */
export function wireLayout() {
  $("toggle-left").addEventListener("click", () => toggleDrawer("left"));
  $("toggle-right").addEventListener("click", () => toggleDrawer("right"));
  $("backdrop").addEventListener("click", closeDrawers);
}
