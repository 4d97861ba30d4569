// The page's state and the user's preferences: what every other module reads and changes.

import { applyMacros } from "./cards.js";
import { settings } from "./store.js";

export const DEFAULT_CHAR = {
  id: "default",
  name: "Assistant",
  description: "A helpful general-purpose assistant. Import a SillyTavern character card to chat with someone else.",
  personality: "",
  scenario: "",
  first_mes: "Hello! I'm your assistant. How can I help you today?",
  mes_example: "",
  system_prompt: "You are a helpful assistant.",
  post_history_instructions: "",
  alternate_greetings: [],
  tags: [],
  avatar: "",
  builtin: true,
};
const DEFAULT_SYSTEM = "Write {{char}}'s next reply in a fictional chat between {{char}} and {{user}}.";

export const PRESETS = {
  balanced: { label: "Balanced", temperature: 0.8, top_p: 0.95, top_k: 40, min_p: 0.05, repetition_penalty: 1.1 },
  creative: { label: "Creative", temperature: 1.1, top_p: 1, top_k: 0, min_p: 0.1, repetition_penalty: 1.05 },
  precise: { label: "Precise", temperature: 0.3, top_p: 0.9, top_k: 20, min_p: 0.1, repetition_penalty: 1.05 },
  greedy: { label: "Deterministic (greedy)", temperature: 0, top_p: 1, top_k: 1, min_p: 0, repetition_penalty: 1 },
};
export const SAMPLER_KEYS = ["temperature", "top_p", "top_k", "min_p", "repetition_penalty"];

export const state = {
  status: null,
  chars: new Map([[DEFAULT_CHAR.id, DEFAULT_CHAR]]),
  chats: [],
  char: DEFAULT_CHAR,
  chat: null,
  gen: null, // {controller, genkey, index, stopped}
  lastSent: null, // {prompt, stop, tokens, template}
  draftTokens: 0,
  promptTokens: 0,
  lastReply: null, // {tps, tokens} of this page's last reply, shown over the server's figure
  templatesLoaded: false, // the prompt-format list matches the answering model
};

export const prefs = {
  template: settings.load("template", ""),
  userName: settings.load("userName", "User"),
  systemPrompt: settings.load("systemPrompt", DEFAULT_SYSTEM),
  showRaw: settings.load("showRaw", false),
  preset: settings.load("preset", "balanced"),
  samplers: { ...PRESETS.balanced, max_tokens: 300, ...settings.load("samplers", {}) },
};
delete prefs.samplers.label;

export const userName = () => prefs.userName.trim() || "User";
export const macros = (text) => applyMacros(text, state.char.name, userName());
export const msgText = (m) => m.swipes[m.swipe] ?? "";
export const nCtx = () => state.status?.context?.size || 0;
/** Whether the model answering is loaded (the last status read): the page's own reads (the
 * prompt preview, token counts) wait for that, since a request to an unloaded model loads it. */
export const modelLoaded = () => state.status?.model?.status === "loaded";
