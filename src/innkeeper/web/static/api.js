// Talking to the innkeeper server: the API key, JSON calls, and streamed completions.

const KEY_NAME = "innkeeper.apiKey";

export class AuthError extends Error {}
export class ApiError extends Error {
  constructor(message, status = 0) {
    super(message);
    this.status = status; // the HTTP status, so callers can tell "no such route" (404) apart
  }
}

let askForKey = async () => null; // set by the page: shows the key dialog, resolves to a key or null

export function onKeyNeeded(fn) {
  askForKey = fn;
}

export function apiKey() {
  try {
    return sessionStorage.getItem(KEY_NAME) || "";
  } catch {
    return "";
  }
}

export function setApiKey(key) {
  try {
    if (key) sessionStorage.setItem(KEY_NAME, key);
    else sessionStorage.removeItem(KEY_NAME);
  } catch {
    /* private mode: the key lives only as long as this page */
  }
}

function headers(json) {
  const h = {};
  if (json) h["Content-Type"] = "application/json";
  const key = apiKey();
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

async function errorMessage(res) {
  try {
    const body = await res.json();
    const e = body.error ?? body.detail ?? body;
    if (typeof e === "string") return e;
    if (e && typeof e.message === "string") return e.message;
    if (e && typeof e.msg === "string") return e.msg; // the /api family: {"detail": {"msg", "type"}}
    return JSON.stringify(e).slice(0, 300);
  } catch {
    return res.status + " " + res.statusText;
  }
}

/** fetch() with the key; a 401 asks the user for a key once and retries. */
export async function request(path, { method = "GET", body, signal, ask = true } = {}) {
  for (let attempt = 0; ; attempt++) {
    const res = await fetch(path, {
      method,
      headers: headers(body !== undefined),
      body: body === undefined ? undefined : JSON.stringify(body),
      signal,
    });
    if (res.status !== 401) {
      if (!res.ok) throw new ApiError(await errorMessage(res), res.status);
      return res;
    }
    // Load, unload, pull and delete want the server's --admin-key (which also opens the API).
    const admin = /admin/i.test(await errorMessage(res));
    if (!ask || attempt >= 3) throw new AuthError(admin ? "this needs the server's admin key" : apiKey() ? "the API key was refused" : "this server needs an API key");
    const hint = admin ? "This needs the server's admin key (--admin-key)." : attempt > 0 || apiKey() ? "That key was refused. Try again." : "";
    const key = await askForKey(hint);
    if (!key) throw new AuthError("this server needs an API key");
    setApiKey(key);
  }
}

export async function getJson(path, opts) {
  return (await request(path, opts)).json();
}

export const postJson = (path, body, opts = {}) => getJson(path, { ...opts, method: "POST", body });

/**
 * POST /v1/completions (or `path`: /v1/chat/completions) with stream: true; calls onText(piece) for each piece and resolves to
 * {finish_reason, usage, timings}: the finish chunk's, with the usage of the choice-less chunk
 * that `include_usage` adds after it (OpenAI's shape). Aborting `signal` closes the connection,
 * which the server turns into a cancel.
 */
export async function streamCompletion(body, { signal, onText, path = "/v1/completions" }) {
  const streamBody = { ...body, stream: true, stream_options: { include_usage: true } };
  const res = await request(path, { method: "POST", body: streamBody, signal });
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let final = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.search(/\r?\n\r?\n/)) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut).replace(/^\r?\n\r?\n/, "");
      const data = event
        .split(/\r?\n/)
        .filter((l) => l.startsWith("data:"))
        .map((l) => l.slice(5).replace(/^ /, ""))
        .join("\n");
      if (!data || data === "[DONE]") continue;
      let chunk;
      try {
        chunk = JSON.parse(data);
      } catch {
        continue;
      }
      if (chunk.error) throw new ApiError(chunk.error.message || "generation failed");
      const choice = chunk.choices && chunk.choices[0];
      const piece = choice && (choice.text ?? choice.delta?.content); // completions, chat
      if (piece) onText(piece);
      if (choice && choice.finish_reason) final = { finish_reason: choice.finish_reason, usage: chunk.usage, timings: chunk.timings };
      if (final && chunk.usage) final.usage = chunk.usage;
    }
  }
  return final;
}
