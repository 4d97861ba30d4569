"""Name the prompt format a Jinja chat template implements, from its literal markers.

SillyTavern users pick "ChatML", "Llama 3", "Alpaca"… by name; telling them which one a GGUF's
own template is saves a wrong guess. Detection is by the special strings each format emits, most
specific first (Llama-3 also contains `<|`, Phi-3 also contains `<|end|>`-style tags).
Rendering templates is `engine/templates.py`'s job, not this module's.
"""

from __future__ import annotations

# (name, markers that must all appear). Order matters: most specific first.
_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("llama3", ("<|start_header_id|>", "<|eot_id|>")),
    ("llama4", ("<|header_start|>", "<|eot|>")),
    ("gemma", ("<start_of_turn>", "<end_of_turn>")),
    ("command-r", ("<|START_OF_TURN_TOKEN|>",)),
    ("deepseek", ("<\uff5cUser\uff5c>",)),  # fullwidth bars, as DeepSeek writes them
    ("gpt-oss", ("<|start|>", "<|channel|>")),
    ("phi4", ("<|im_start|>", "<|im_sep|>")),
    ("chatml", ("<|im_start|>", "<|im_end|>")),
    ("phi3", ("<|user|>", "<|end|>", "<|assistant|>")),
    ("zephyr", ("<|user|>", "<|assistant|>")),
    ("metharme", ("<|system|>", "<|user|>", "<|model|>")),
    ("granite", ("<|start_of_role|>",)),
    ("mistral-v7", ("[SYSTEM_PROMPT]", "[INST]")),
    ("llama2", ("<<SYS>>", "[INST]")),
    ("mistral", ("[INST]", "[/INST]")),
    ("vicuna", ("USER:", "ASSISTANT:")),
    ("alpaca", ("### Instruction:", "### Response:")),
)


def detect_template(template: str | None) -> str | None:
    """The named format of a chat template, or None when there is none or it is unknown."""
    if not template:
        return None
    for name, markers in _RULES:
        if all(m in template for m in markers):
            return name
    return None


# GGUF `general.architecture` → the built-in format its instruct models use. For GGUFs that
# carry no template (base models such as Gemma 3 PT, hand conversions): llama.cpp's server
# falls back to ChatML for all of them; naming the family's own format is closer to what the
# model saw in training. Only formats innkeeper renders as built-ins are listed.
_ARCH_FORMATS: dict[str, str] = {
    "gemma": "gemma",
    "gemma2": "gemma",
    "gemma3": "gemma",
    "gemma3n": "gemma",
    "qwen": "chatml",
    "qwen2": "chatml",
    "qwen2moe": "chatml",
    "qwen2vl": "chatml",
    "qwen3": "chatml",
    "qwen3moe": "chatml",
    "internlm2": "chatml",
    "phi3": "phi3",
    "phimoe": "phi3",
    "mistral3": "mistral",
}
LLAMA3_MIN_VOCAB = 128_000  # Llama 3.x's tokenizer has 128,256 tokens; Llama 2 / Mistral 32,000


def template_for_architecture(architecture: str | None, n_vocab: int = 0) -> str | None:
    """The built-in format for a GGUF with no chat template, from its architecture; None if
    the architecture says nothing reliable (the caller then uses Alpaca).

    `llama` covers several families, told apart by vocabulary size: Llama 3.x (128k tokens)
    uses its header format, Llama 2 and Mistral (32k / 32,768) the `[INST]` format.
    """
    arch = (architecture or "").lower()
    if arch == "llama":
        if n_vocab >= LLAMA3_MIN_VOCAB:
            return "llama3"
        if n_vocab in (32_000, 32_768):
            return "mistral"
        return None
    return _ARCH_FORMATS.get(arch)
