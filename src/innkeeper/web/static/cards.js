// SillyTavern character cards: PNG files with the card as base64 JSON in a `chara` (V2) or
// `ccv3` (V3) text chunk, or the same JSON as a plain file. Everything here is untrusted input.

const PNG_SIGNATURE = [137, 80, 78, 71, 13, 10, 26, 10];
const MAX_CARD_BYTES = 32 * 1024 * 1024;

export class CardError extends Error {}

function latin1(bytes) {
  let s = "";
  for (let i = 0; i < bytes.length; i += 0x8000) {
    s += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  }
  return s;
}

async function inflate(bytes) {
  if (typeof DecompressionStream === "undefined") throw new CardError("this browser cannot read compressed PNG text");
  const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("deflate"));
  return new Uint8Array(await new Response(stream).arrayBuffer());
}

/** Text chunks (tEXt, zTXt, iTXt) of a PNG as {keyword: text}. */
export async function pngTextChunks(buffer) {
  const bytes = new Uint8Array(buffer);
  if (bytes.length < 8 || PNG_SIGNATURE.some((b, i) => bytes[i] !== b)) {
    throw new CardError("not a PNG file");
  }
  const view = new DataView(buffer);
  const out = {};
  let pos = 8;
  while (pos + 8 <= bytes.length) {
    const length = view.getUint32(pos);
    const type = latin1(bytes.subarray(pos + 4, pos + 8));
    const start = pos + 8;
    const end = start + length;
    if (end + 4 > bytes.length) throw new CardError("the PNG file is truncated");
    const data = bytes.subarray(start, end);
    const nul = data.indexOf(0);
    if (nul > 0 && (type === "tEXt" || type === "zTXt" || type === "iTXt")) {
      const keyword = latin1(data.subarray(0, nul));
      if (type === "tEXt") {
        out[keyword] = latin1(data.subarray(nul + 1));
      } else if (type === "zTXt") {
        out[keyword] = latin1(await inflate(data.subarray(nul + 2)));
      } else {
        const compressed = data[nul + 1] === 1;
        let p = nul + 3;
        p = data.indexOf(0, p) + 1; // language tag
        p = data.indexOf(0, p) + 1; // translated keyword
        if (p > 0) {
          const raw = data.subarray(p);
          out[keyword] = new TextDecoder().decode(compressed ? await inflate(raw) : raw);
        }
      }
    }
    if (type === "IEND") break;
    pos = end + 4;
  }
  return out;
}

function decodeBase64Json(text) {
  let bytes;
  try {
    const bin = atob(text.trim());
    bytes = Uint8Array.from(bin, (c) => c.charCodeAt(0));
  } catch {
    throw new CardError("the card's text chunk is not valid base64");
  }
  try {
    return JSON.parse(new TextDecoder().decode(bytes));
  } catch {
    throw new CardError("the card's text chunk is not valid JSON");
  }
}

const str = (v) => (typeof v === "string" ? v : "");

/** Any card shape (V1 flat, V2 `chara_card_v2`, V3 `chara_card_v3`) -> one flat character. */
export function normalizeCard(json) {
  if (!json || typeof json !== "object" || Array.isArray(json)) throw new CardError("the card is not a JSON object");
  const spec = str(json.spec);
  const d = json.data && typeof json.data === "object" && (spec || !json.name) ? json.data : json;
  const name = str(d.name) || str(json.name) || str(json.char_name);
  if (!name.trim()) throw new CardError("the card has no character name");
  const greetings = Array.isArray(d.alternate_greetings) ? d.alternate_greetings.filter((g) => typeof g === "string" && g.trim()) : [];
  return {
    name: name.trim(),
    description: str(d.description) || str(json.char_persona),
    personality: str(d.personality),
    scenario: str(d.scenario) || str(json.world_scenario),
    first_mes: str(d.first_mes) || str(json.char_greeting),
    mes_example: str(d.mes_example) || str(json.example_dialogue),
    system_prompt: str(d.system_prompt),
    post_history_instructions: str(d.post_history_instructions),
    creator_notes: str(d.creator_notes),
    creator: str(d.creator),
    alternate_greetings: greetings,
    tags: Array.isArray(d.tags) ? d.tags.filter((t) => typeof t === "string").slice(0, 50) : [],
    spec: spec || "chara_card_v1",
  };
}

function dataUrl(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

/** A File from the picker -> {card, avatar (data URL or ""), kind: "card"} or a backup. */
export async function readCardFile(file) {
  if (file.size > MAX_CARD_BYTES) throw new CardError("the file is larger than 32 MB");
  const buffer = await file.arrayBuffer();
  const head = new Uint8Array(buffer.slice(0, 8));
  if (PNG_SIGNATURE.every((b, i) => head[i] === b)) {
    const chunks = await pngTextChunks(buffer);
    // V3 cards keep a V2 `chara` chunk for older readers; the `ccv3` one is the richer copy.
    const text = chunks.ccv3 ?? chunks.chara;
    if (text === undefined) throw new CardError("this PNG has no character card (no 'chara' or 'ccv3' text chunk)");
    return { kind: "card", card: normalizeCard(decodeBase64Json(text)), avatar: await dataUrl(file) };
  }
  let json;
  try {
    json = JSON.parse(new TextDecoder().decode(buffer));
  } catch {
    throw new CardError("the file is neither a PNG card nor JSON");
  }
  if (json && json.app === "innkeeper" && Array.isArray(json.characters)) return { kind: "backup", backup: json };
  const avatar = json && typeof json.avatar === "string" && json.avatar.startsWith("data:image/") ? json.avatar : "";
  return { kind: "card", card: normalizeCard(json), avatar };
}

/** A character as a SillyTavern V2 card (what other front ends import). */
export function toV2Card(ch) {
  return {
    spec: "chara_card_v2",
    spec_version: "2.0",
    data: {
      name: ch.name,
      description: ch.description,
      personality: ch.personality,
      scenario: ch.scenario,
      first_mes: ch.first_mes,
      mes_example: ch.mes_example,
      creator_notes: ch.creator_notes,
      system_prompt: ch.system_prompt,
      post_history_instructions: ch.post_history_instructions,
      alternate_greetings: ch.alternate_greetings,
      tags: ch.tags,
      creator: ch.creator,
      character_version: "",
      extensions: {},
    },
  };
}

/** SillyTavern's name macros ({{char}}, {{user}} and the legacy <BOT>/<USER>). */
export function applyMacros(text, charName, userName) {
  return String(text ?? "")
    .replace(/\{\{char\}\}|<BOT>/gi, charName)
    .replace(/\{\{user\}\}|<USER>/gi, userName);
}
