"""Chat templates: the GGUF's own Jinja template, else a named built-in instruct format.

The built-ins are the instruct formats SillyTavern users pick by name (Alpaca, ChatML…).
They are defined once here, as data; the chat route renders them and the built-in web page
asks the server to render them, so what the page shows as the raw prompt is what is sent.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from innkeeper.engine.backend import ModelInfo
from innkeeper.models.templates_detect import detect_template, template_for_architecture


class TemplateRenderError(ValueError):
    """The messages could not be rendered with the chosen template."""


@dataclass(frozen=True)
class InstructFormat:
    """A named instruct format: what goes around each role's message."""

    name: str
    label: str
    system: tuple[str, str]
    user: tuple[str, str]
    assistant: tuple[str, str]
    stop: tuple[str, ...]
    system_in_user: bool = False  # formats with no system role fold it into the first user turn


BUILTIN_FORMATS: dict[str, InstructFormat] = {
    f.name: f
    for f in (
        InstructFormat(
            "alpaca",
            "Alpaca",
            ("", "\n\n"),
            ("### Instruction:\n", "\n\n"),
            ("### Response:\n", "\n\n"),
            ("### Instruction:", "\n### Input:"),
        ),
        InstructFormat(
            "chatml",
            "ChatML",
            ("<|im_start|>system\n", "<|im_end|>\n"),
            ("<|im_start|>user\n", "<|im_end|>\n"),
            ("<|im_start|>assistant\n", "<|im_end|>\n"),
            ("<|im_end|>", "<|im_start|>"),
        ),
        InstructFormat(
            "mistral",
            "Mistral",
            ("", "\n\n"),
            ("[INST] ", " [/INST]"),
            ("", "</s>"),
            ("[INST]", "</s>"),
            system_in_user=True,
        ),
        InstructFormat(
            "llama3",
            "Llama-3",
            ("<|start_header_id|>system<|end_header_id|>\n\n", "<|eot_id|>"),
            ("<|start_header_id|>user<|end_header_id|>\n\n", "<|eot_id|>"),
            ("<|start_header_id|>assistant<|end_header_id|>\n\n", "<|eot_id|>"),
            ("<|eot_id|>", "<|start_header_id|>"),
        ),
        InstructFormat(
            "gemma",
            "Gemma",
            ("", "\n\n"),
            ("<start_of_turn>user\n", "<end_of_turn>\n"),
            ("<start_of_turn>model\n", "<end_of_turn>\n"),
            ("<end_of_turn>", "<start_of_turn>"),
            system_in_user=True,
        ),
        InstructFormat(
            "phi3",
            "Phi-3",
            ("<|system|>\n", "<|end|>\n"),
            ("<|user|>\n", "<|end|>\n"),
            ("<|assistant|>\n", "<|end|>\n"),
            ("<|end|>", "<|user|>"),
        ),
        InstructFormat(
            "vicuna",
            "Vicuna",
            ("", "\n\n"),
            ("USER: ", "\n"),
            ("ASSISTANT: ", "</s>\n"),
            ("USER:", "</s>"),
        ),
        InstructFormat(
            "metharme",
            "Metharme (Pygmalion)",
            ("<|system|>", ""),
            ("<|user|>", ""),
            ("<|model|>", ""),
            ("<|user|>", "<|system|>"),
        ),
    )
}


class ChatTemplate(Protocol):
    name: str
    source: str | None
    stop: tuple[str, ...]

    def render(
        self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True
    ) -> str: ...


def message_text(content: Any) -> str:
    """OpenAI message content may be a string or a list of typed parts; keep the text."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return str(content)


@dataclass(frozen=True)
class BuiltinTemplate:
    fmt: InstructFormat

    @property
    def name(self) -> str:
        return self.fmt.name

    @property
    def source(self) -> str | None:
        return None

    @property
    def stop(self) -> tuple[str, ...]:
        return self.fmt.stop

    def render(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        fmt = self.fmt
        out: list[str] = []
        pending_system = ""
        last = len(messages) - 1
        for i, msg in enumerate(messages):
            role = msg.get("role", "user")
            text = message_text(msg.get("content"))
            if role == "system":
                if fmt.system_in_user:
                    pending_system += text + fmt.system[1]
                else:
                    out.append(fmt.system[0] + text + fmt.system[1])
                continue
            if role == "user":
                out.append(fmt.user[0] + pending_system + text + fmt.user[1])
                pending_system = ""
            else:
                prefix, suffix = fmt.assistant
                # An unfinished last assistant message is continued, not closed.
                closing = "" if i == last and not add_generation_prompt else suffix
                out.append(prefix + text + closing)
        if pending_system:
            out.append(fmt.user[0] + pending_system.rstrip() + fmt.user[1])
        if add_generation_prompt and (not messages or messages[-1].get("role") != "assistant"):
            out.append(fmt.assistant[0])
        return "".join(out)


class JinjaTemplate:
    """A Hugging Face style Jinja chat template, rendered in a sandbox."""

    def __init__(self, source: str, info: ModelInfo, name: str = "gguf") -> None:
        self.name = name
        self.source = source
        self.info = info
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
        try:
            self._tpl = env.from_string(source)
        except TemplateError as exc:
            raise TemplateRenderError(f"the chat template does not parse: {exc}") from exc
        self.format = detect_template(source)
        fmt = BUILTIN_FORMATS.get(_key(self.format or ""))
        self.stop = fmt.stop if fmt else ()
        if name == "gguf" and self.format:
            self.name = f"gguf ({self.format})"

    def render(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        msgs = [{**m, "content": message_text(m.get("content"))} for m in messages]
        try:
            text = self._tpl.render(
                messages=msgs,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.info.bos_token,
                eos_token=self.info.eos_token,
            )
        except TemplateError as exc:
            raise TemplateRenderError(f"the chat template failed: {exc}") from exc
        # The tokenizer adds BOS itself; a second one from the template would double it.
        if self.info.add_bos and self.info.bos_token and text.startswith(self.info.bos_token):
            text = text[len(self.info.bos_token) :]
        return text


def _raise(message: str) -> None:
    raise TemplateRenderError(message)


def resolve_template(ref: str | None, info: ModelInfo) -> ChatTemplate:
    """`--chat-template`: a built-in name, a Jinja file, or None for the model's own."""
    if ref is None:
        if info.chat_template:
            return JinjaTemplate(info.chat_template, info)
        return BuiltinTemplate(BUILTIN_FORMATS[fallback_format(info)])
    fmt = BUILTIN_FORMATS.get(_key(ref))
    if fmt is not None:
        return BuiltinTemplate(fmt)
    path = Path(ref).expanduser()
    if path.is_file():
        return JinjaTemplate(path.read_text(encoding="utf-8"), info, name=path.name)
    names = ", ".join(BUILTIN_FORMATS)
    raise ValueError(f"unknown chat template {ref!r}: use one of {names}, or a Jinja file path")


def fallback_format(info: ModelInfo) -> str:
    """The built-in format for a GGUF without a chat template: its architecture's, else Alpaca."""
    name = template_for_architecture(info.architecture, info.n_vocab)
    return name if name in BUILTIN_FORMATS else "alpaca"


def _key(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "").replace(" ", "")


def template_by_name(name: str | None, default: ChatTemplate) -> ChatTemplate:
    """A per-request template choice: a built-in name, or empty/"model" for the server's own.

    Requests may only name built-ins: a request must never make the server read a file.
    """
    if not name or _key(name) in ("model", "default", "gguf", _key(default.name)):
        return default
    fmt = BUILTIN_FORMATS.get(_key(name))
    if fmt is None:
        raise ValueError(
            f"unknown instruction template {name!r}: use one of {', '.join(BUILTIN_FORMATS)}"
        )
    return BuiltinTemplate(fmt)
