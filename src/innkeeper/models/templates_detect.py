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
