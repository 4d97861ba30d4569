"""EngineConfig: every knob the model and its context are loaded with, each declared once.

Light on purpose (no llama.cpp): the CLI builds its options from these declarations and the
memory plan reads the same values (`innkeeper.models.memory.memory_settings`). To add an engine
setting, add one `setting(...)` field here (default, flags, help, min/max/choices; cross-field
rules in `validate`) and read it where it takes effect: `model_params`/`context_params` in
engine.py for llama.cpp, `Engine.__init__` for the scheduler, `memory.memory_settings` if it
changes memory. `innkeeper serve` gets the option without any other edit.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from innkeeper.settings import (
    ConfigError,
    check_fields,
    lower,
    parse_gpu_layers,
    parse_tensor_split,
    setting,
)

# KV cache types by llama.cpp's names (backend.CACHE_TYPES maps them to ggml type ids).
CACHE_TYPE_NAMES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1")
SPLIT_MODES = ("none", "layer", "row")
DEFAULT_CTX = 4096
# llama.cpp's --cpu-moe pattern (common.h LLM_FFN_EXPS_REGEX): MoE expert tensors.
FFN_EXPS_REGEX = r"\.ffn_(up|down|gate|gate_up)_(ch|)exps"


@dataclass(frozen=True)
class EngineConfig:
    """The engine's settings; `ServerConfig.engine` holds one, the CLI fills it from flags."""

    model_path: Path
    ctx_size: int | None = setting(
        None,
        "--ctx-size",
        "-c",
        min=64,
        help="context size in tokens (default: from the model and memory)",
    )
    gpu_layers: int | None = setting(
        None,
        "--gpu-layers",
        "-ngl",
        parse=parse_gpu_layers,
        help="layers to offload: a number, 'all' or 'auto' (default: auto, from the memory plan)",
    )
    main_gpu: int = setting(
        0,
        "--main-gpu",
        "-mg",
        min=0,
        help="the GPU that holds the whole model with --split-mode none",
    )
    split_mode: str = setting(
        "layer",
        "--split-mode",
        "-sm",
        parse=lower,
        choices=SPLIT_MODES,
        help="how to use several GPUs: none (only --main-gpu), layer, or row",
    )
    tensor_split: tuple[float, ...] | None = setting(
        None,
        "--tensor-split",
        "-ts",
        parse=parse_tensor_split,
        help="share of the model per GPU, e.g. 3,1 (default: the memory plan's split)",
    )
    kv_offload: bool = setting(
        True,
        "--kv-offload/--no-kv-offload",
        "-kvo/-nkvo",
        help="keep the KV cache on the GPU with its layers (--no-kv-offload: in RAM)",
    )
    cpu_moe: bool = setting(
        False,
        "--cpu-moe",
        "-cmoe",
        help="keep every MoE expert weight in RAM (attention and shared weights stay on GPU)",
    )
    n_cpu_moe: int = setting(
        0,
        "--n-cpu-moe",
        "-ncmoe",
        min=0,
        help="keep the MoE expert weights of the first N layers in RAM",
    )
    threads: int = setting(0, "--threads", "-t", min=0, help="decode threads (0 = physical cores)")
    threads_batch: int = setting(
        0, "--threads-batch", min=0, help="prompt threads (0 = same as --threads)"
    )
    batch_size: int = setting(2048, "--batch-size", "-b", min=1, help="logical batch size")
    ubatch_size: int = setting(512, "--ubatch-size", "-ub", min=1, help="physical batch size")
    parallel: int = setting(
        4, "--parallel", "-np", min=1, max=64, help="generation slots served at once"
    )
    flash_attn: str = setting(
        "auto",
        "--flash-attn",
        "-fa",
        parse=lower,
        choices=("auto", "on", "off"),
        help="on, off or auto",
    )
    cache_type_k: str = setting(
        "f16",
        "--cache-type-k",
        "-ctk",
        parse=lower,
        choices=CACHE_TYPE_NAMES,
        what="cache type",
        help="KV cache type for K: f16, q8_0, q4_0… (overrides --cache-type)",
    )
    cache_type_v: str = setting(
        "f16",
        "--cache-type-v",
        "-ctv",
        parse=lower,
        choices=CACHE_TYPE_NAMES,
        what="cache type",
        help="KV cache type for V: f16, q8_0, q4_0… (quantized V needs flash attention; "
        "overrides --cache-type)",
    )
    use_mmap: bool = setting(
        True,
        "--mmap/--no-mmap",
        help="map the model file (--no-mmap: read it into memory, e.g. when the file may change)",
    )
    use_mlock: bool = setting(
        False, "--mlock", help="lock the model in RAM (needs a high enough `ulimit -l`)"
    )
    chat_template: str | None = setting(
        None,
        "--chat-template",
        help="built-in name (alpaca, chatml, mistral, llama3, gemma, phi3, vicuna, metharme) "
        "or a Jinja file",
    )
    cache_reuse: int = setting(
        32,
        "--cache-reuse",
        min=0,
        help="min. chunk (tokens) moved in the KV cache after a prompt trim; 0 = off",
    )
    cache_ram_mib: int = setting(
        2048,
        "--cache-ram",
        min=0,
        help="MiB of RAM for idle conversations' KV caches, restored when they return; 0 = off",
    )
    max_queue: int = setting(
        64, "--max-queue", min=0, help="requests that may wait for a slot before 503"
    )
    swa_full: bool = setting(
        False,
        "--swa-full",
        help="sliding-window layers (Gemma…) keep the whole context instead of their window: "
        "more memory, but a trimmed prompt can be shifted instead of re-evaluated",
    )
    ctx_checkpoints: int = setting(
        32,
        "--ctx-checkpoints",
        min=0,
        help="saved states per slot that let a sliding-window or recurrent model reuse a "
        "prompt from before its window (counted in --cache-ram); 0 = off",
    )

    def validate(self) -> EngineConfig:
        """Raise ConfigError for a setting llama.cpp would refuse or ignore; returns self."""
        check_fields(self)
        if self.cache_type_v not in ("f16", "bf16", "f32") and self.flash_attn == "off":
            raise ConfigError("a quantized V cache needs flash attention: add --flash-attn on")
        if self.tensor_split is not None and self.split_mode == "none":
            raise ConfigError("--tensor-split has no effect with --split-mode none: drop one")
        return self

    @property
    def cpu_tensor_patterns(self) -> tuple[str, ...]:
        """Tensor-name regexes kept in RAM, built as llama-server builds --cpu-moe/--n-cpu-moe."""
        if self.cpu_moe:
            return (FFN_EXPS_REGEX,)
        return tuple(rf"blk\.{i}{FFN_EXPS_REGEX}" for i in range(self.n_cpu_moe))
