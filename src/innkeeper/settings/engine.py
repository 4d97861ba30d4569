"""EngineConfig: every knob the model and its context are loaded with, each declared once.

Light on purpose (no llama.cpp): `serve` and `fit` build their options from these declarations,
HTTP loads parse theirs from them (settings/load.py) and the memory plan reads the same values
(models/memory). To add an engine setting, add one `setting(...)` field here (default, flags,
help, min/max/choices, panel; `memory=True` if it changes what the model needs, `loadable=True`
if HTTP clients may give it; cross-field rules in `validate`) and read it where it takes
effect: `model_params`/`context_params` in engine.py for llama.cpp, `Engine.__init__` for the
scheduler, the memory plan if it changes memory. `innkeeper serve` gets the option without any
other edit.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from innkeeper.settings import (
    GPU_LAYER_WORDS,
    PANEL_MEMORY,
    PANEL_MODEL,
    PANEL_PERFORMANCE,
    ConfigError,
    Setting,
    Shorthand,
    check_fields,
    lower,
    parse_endpoints,
    parse_gpu_layers,
    parse_tensor_split,
    setting,
)


@dataclass(frozen=True)
class CacheType:
    """A KV cache type llama.cpp accepts: its ggml type id and how it packs values."""

    ggml_type: int  # enum ggml_type (ggml.h)
    block: int  # values per block (1: a plain float type)
    block_bytes: int  # bytes per block

    @property
    def quantized(self) -> bool:
        return self.block > 1


# KV cache types by llama.cpp's names: the one table (the engine maps names to ggml types with
# it, the memory plan sizes rows with it, the CLI and HTTP take its names).
CACHE_TYPES: dict[str, CacheType] = {
    "f32": CacheType(0, 1, 4),
    "f16": CacheType(1, 1, 2),
    "bf16": CacheType(30, 1, 2),
    "q8_0": CacheType(8, 32, 34),
    "q4_0": CacheType(2, 32, 18),
    "q4_1": CacheType(3, 32, 20),
    "iq4_nl": CacheType(20, 32, 18),
    "q5_0": CacheType(6, 32, 22),
    "q5_1": CacheType(7, 32, 24),
}
CACHE_TYPE_NAMES = tuple(CACHE_TYPES)
QUANTIZED_CACHE_TYPES = tuple(name for name, t in CACHE_TYPES.items() if t.quantized)
FLASH_ATTN_MODES = ("auto", "on", "off")
SPLIT_MODES = ("none", "layer", "row")
POOLING_MODES = ("none", "mean", "cls", "last", "rank")  # llama.cpp's --pooling names
DEFAULT_CTX = 4096
MAX_CTX = 2**20  # what a client may ask for (Qwen2.5-1M's trained context fits)
# llama.cpp's --cpu-moe pattern (common.h LLM_FFN_EXPS_REGEX): MoE expert tensors.
FFN_EXPS_REGEX = r"\.ffn_(up|down|gate|gate_up)_(ch|)exps"


def check_v_cache(cache_type_v: str, flash_attn: bool) -> None:
    """llama.cpp refuses a quantized V cache without flash attention (llama_init_from_model).

    The one place this rule is written: `EngineConfig.validate` (flash attention "off"), the
    memory plan (flash attention as resolved for the model) and the HTTP load schema
    (settings/load.py) all use it.
    """
    if cache_type_v in QUANTIZED_CACHE_TYPES and not flash_attn:
        raise ConfigError(
            f"a quantized V cache ({cache_type_v}) needs flash attention: add --flash-attn on "
            "(or keep the V cache f16)"
        )


_CACHE_TYPE_HELP = "f16, q8_0, q4_0… (a quantized V needs flash attention)"


@dataclass(frozen=True)
class EngineConfig:
    """The engine's settings; `ServerConfig.engine` holds one, the CLI fills it from flags."""

    model_path: Path
    ctx_size: int | None = setting(
        None,
        "--ctx-size",
        "-c",
        min=64,
        max=MAX_CTX,
        help="context size in tokens (default: the largest up to 8192 that fits)",
        panel=PANEL_MEMORY,
        memory=True,
        loadable=True,
        aliases=("n_ctx", "max_seq_len", "ctx-size"),
    )
    gpu_layers: int | None = setting(
        None,
        "--gpu-layers",
        "-ngl",
        parse=parse_gpu_layers,
        words=GPU_LAYER_WORDS,
        metavar="N|all",
        help="layers to offload: a number (negative: all), all, or auto (default: auto, as "
        "many as fit)",
        panel=PANEL_MEMORY,
        memory=True,
        loadable=True,
        aliases=("n_gpu_layers", "ngl", "gpu-layers"),
    )
    main_gpu: int = setting(
        0,
        "--main-gpu",
        "-mg",
        min=0,
        help="the GPU that holds the whole model with --split-mode none",
        panel=PANEL_MEMORY,
        memory=True,
    )
    split_mode: str = setting(
        "layer",
        "--split-mode",
        "-sm",
        parse=lower,
        choices=SPLIT_MODES,
        metavar="MODE",
        help="how to use several GPUs: none (only --main-gpu), layer, or row",
        panel=PANEL_MEMORY,
        memory=True,
    )
    tensor_split: tuple[float, ...] | None = setting(
        None,
        "--tensor-split",
        "-ts",
        parse=parse_tensor_split,
        metavar="N,N…",
        help="share of the model per GPU, e.g. 3,1 (default: the memory plan's split)",
        panel=PANEL_MEMORY,
        memory=True,
    )
    rpc: tuple[str, ...] = setting(
        (),
        "--rpc",
        parse=parse_endpoints,
        metavar="HOST:PORT,…",
        help="`innkeeper worker`s lending their devices (first in --tensor-split)",
        panel=PANEL_MEMORY,
        memory=True,
        loadable=True,  # over HTTP: loopback or the server's own --rpc (serving/load_settings)
    )
    kv_offload: bool = setting(
        True,
        "--kv-offload/--no-kv-offload",
        "-kvo/-nkvo",
        help="keep the KV cache on the GPU with its layers (--no-kv-offload: in RAM)",
        panel=PANEL_MEMORY,
        memory=True,
    )
    cpu_moe: bool = setting(
        False,
        "--cpu-moe",
        "-cmoe",
        help="keep every MoE expert weight in RAM (attention and shared weights stay on GPU)",
        panel=PANEL_MEMORY,
        memory=True,
    )
    n_cpu_moe: int = setting(
        0,
        "--n-cpu-moe",
        "-ncmoe",
        min=0,
        help="keep the MoE expert weights of the first N layers in RAM",
        panel=PANEL_MEMORY,
        memory=True,
    )
    threads: int = setting(
        0,
        "--threads",
        "-t",
        min=0,
        help="decode threads (0: the physical cores)",
        panel=PANEL_PERFORMANCE,
    )
    threads_batch: int = setting(
        0,
        "--threads-batch",
        min=0,
        help="prompt threads (0: as --threads)",
        panel=PANEL_PERFORMANCE,
    )
    batch_size: int = setting(
        2048,
        "--batch-size",
        "-b",
        min=1,
        help="logical batch size",
        panel=PANEL_PERFORMANCE,
        memory=True,
    )
    ubatch_size: int = setting(
        512,
        "--ubatch-size",
        "-ub",
        min=1,
        help="physical batch size",
        panel=PANEL_PERFORMANCE,
        memory=True,
    )
    parallel: int = setting(
        4,
        "--parallel",
        "-np",
        min=1,
        max=64,
        help="generation slots served at once",
        panel=PANEL_PERFORMANCE,
        memory=True,
        loadable=True,
        aliases=("n_parallel", "np"),
    )
    flash_attn: str = setting(
        "auto",
        "--flash-attn",
        "-fa",
        parse=lower,
        choices=FLASH_ATTN_MODES,
        help="flash attention: on, off, or auto (on where llama.cpp supports it)",
        panel=PANEL_MEMORY,
        memory=True,
        loadable=True,
        aliases=("flash-attn",),
    )
    cache_type_k: str = setting(
        "f16",
        "--cache-type-k",
        "-ctk",
        parse=lower,
        choices=CACHE_TYPE_NAMES,
        what="cache type",
        metavar="TYPE",
        help="KV cache type for K: f16, q8_0, q4_0… (overrides --cache-type)",
        panel=PANEL_MEMORY,
        memory=True,
        loadable=True,
    )
    cache_type_v: str = setting(
        "f16",
        "--cache-type-v",
        "-ctv",
        parse=lower,
        choices=CACHE_TYPE_NAMES,
        what="cache type",
        metavar="TYPE",
        help=f"KV cache type for V: {_CACHE_TYPE_HELP} (overrides --cache-type)",
        panel=PANEL_MEMORY,
        memory=True,
        loadable=True,
    )
    use_mmap: bool = setting(
        True,
        "--mmap/--no-mmap",
        help="map the model file (--no-mmap: read it into memory, e.g. when the file may change)",
        panel=PANEL_MODEL,
    )
    use_mlock: bool = setting(
        False,
        "--mlock",
        help="lock the model in RAM (needs a high enough `ulimit -l`)",
        panel=PANEL_MODEL,
    )
    mmproj: Path | None = setting(  # noqa: RUF009 (a Path is immutable)
        None,
        "--mmproj",
        parse=Path,
        metavar="FILE",
        help="the model's vision projector (mmproj-*.gguf) for image input "
        "(default: an mmproj*.gguf beside the model)",
        panel=PANEL_MODEL,
    )
    chat_template: str | None = setting(
        None,
        "--chat-template",
        metavar="NAME|FILE",
        help="built-in name (alpaca, chatml, mistral, llama3, gemma, phi3, vicuna, metharme) "
        "or a Jinja file (default: the model's own)",
        panel=PANEL_MODEL,
    )
    pooling: str | None = setting(
        None,
        "--pooling",
        parse=lower,
        choices=POOLING_MODES,
        metavar="TYPE",
        help="how embeddings pool token vectors: none, mean, cls, last or rank (default: the "
        "model's own; mean for chat models)",
        panel=PANEL_MODEL,
    )
    cache_reuse: int = setting(
        32,
        "--cache-reuse",
        min=0,
        help="min. chunk (tokens) moved in the KV cache after a prompt trim; 0: off",
        panel=PANEL_PERFORMANCE,
    )
    cache_ram_mib: int = setting(
        2048,
        "--cache-ram",
        min=0,
        metavar="MIB",
        help="MiB of RAM for idle conversations' KV caches, restored when they return; 0: off",
        panel=PANEL_PERFORMANCE,
    )
    max_queue: int = setting(
        64,
        "--max-queue",
        min=0,
        help="requests that may wait for a slot before 503",
        panel=PANEL_PERFORMANCE,
    )
    swa_full: bool = setting(
        False,
        "--swa-full",
        help="sliding-window layers (Gemma…) keep the whole context instead of their window: "
        "more memory, but a trimmed prompt can be shifted instead of re-evaluated",
        panel=PANEL_MEMORY,
        memory=True,
    )
    ctx_checkpoints: int = setting(
        32,
        "--ctx-checkpoints",
        min=0,
        help="saved states per slot that let a sliding-window or recurrent model reuse a "
        "prompt from before its window (counted in --cache-ram); 0: off",
        panel=PANEL_PERFORMANCE,
        memory=True,
    )

    SHORTHANDS: ClassVar[tuple[Shorthand, ...]] = (
        Shorthand(
            "cache_type",
            ("cache_type_k", "cache_type_v"),
            Setting(
                ("--cache-type",),
                f"KV cache type for K and V: {_CACHE_TYPE_HELP}",
                parse=lower,
                choices=CACHE_TYPE_NAMES,
                what="cache type",
                panel=PANEL_MEMORY,
                metavar="TYPE",
                memory=True,
                loadable=True,
            ),
        ),
    )

    def validate(self) -> EngineConfig:
        """Raise ConfigError for a setting llama.cpp would refuse or ignore; returns self."""
        check_fields(self)
        check_v_cache(self.cache_type_v, self.flash_attn != "off")
        if self.tensor_split is not None and self.split_mode == "none":
            raise ConfigError("--tensor-split has no effect with --split-mode none: drop one")
        if len(set(self.rpc)) != len(self.rpc):
            raise ConfigError("--rpc names a worker twice")
        if self.mmproj is not None and not self.mmproj.is_file():
            raise ConfigError(f"--mmproj: {self.mmproj} is not a file")
        return self

    @property
    def cpu_tensor_patterns(self) -> tuple[str, ...]:
        """Tensor-name regexes kept in RAM, built as llama-server builds --cpu-moe/--n-cpu-moe."""
        if self.cpu_moe:
            return (FFN_EXPS_REGEX,)
        return tuple(rf"blk\.{i}{FFN_EXPS_REGEX}" for i in range(self.n_cpu_moe))

    def experts_in_ram(self, il: int) -> bool:
        """Whether layer `il`'s MoE expert tensors stay in RAM (--cpu-moe / --n-cpu-moe)."""
        return self.cpu_moe or il < self.n_cpu_moe
