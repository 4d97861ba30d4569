// Small DOM and text helpers shared by the page's modules: no state of their own but the toast.

export const $ = (id) => document.getElementById(id);

let toastTimer = 0;
export function toast(message, kind = "error") {
  const el = $("toast");
  el.textContent = message;
  el.className = "toast " + kind;
  el.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => (el.hidden = true), kind === "error" ? 6000 : 2500);
}

export function formatBytes(n) {
  if (typeof n !== "number" || !isFinite(n)) return "?";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i++;
  }
  return (i ? n.toFixed(n < 10 ? 2 : 1) : n) + " " + units[i];
}

export function formatCount(n) {
  if (typeof n !== "number") return "?";
  if (n >= 1e9) return (n / 1e9).toFixed(2) + " B";
  if (n >= 1e6) return Math.round(n / 1e6) + " M";
  return String(n);
}

function escapeHtml(s) {
  return s.replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}

/** Just enough Markdown for chats (code, bold, *actions*), from escaped text: never raw HTML. */
export function formatText(text) {
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

export function download(name, data) {
  const blob = new Blob([JSON.stringify(data, null, 2)], { type: "application/json" });
  const a = document.createElement("a");
  a.href = URL.createObjectURL(blob);
  a.download = name;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(a.href), 1000);
}

export function safeName(s) {
  return (s || "chat").replace(/[^\w.-]+/g, "_").slice(0, 60);
}

export async function copyText(text, what) {
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

/** The CSS class of a memory plan's verdict: fits, fits partly (split or offloaded), or not. */
export function verdictClass(plan) {
  const code = String(plan?.verdict_code || plan?.verdict || "");
  if (plan?.fits === false || /swap|not|too/i.test(code)) return "verdict-bad";
  if (/partial|split/i.test(code)) return "verdict-warn";
  return "verdict-ok";
}

export function avatarEl(ch, cls) {
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
