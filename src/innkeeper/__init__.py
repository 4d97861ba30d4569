"""innkeeper: a self-hosted LLM server for SillyTavern, OpenAI and KoboldAI clients."""

from __future__ import annotations

__version__ = "0.1.0"


def _load_llama_first() -> None:
    """Map llama.cpp's shared libraries before anything imports numpy (docs/gpu-load-order.md).

    On a CUDA build, a process that imported numpy (or gguf, which imports it) before
    libllama was loaded crashed with SIGSEGV inside llama_model_load_from_file; the other order
    works. Every process that may load a model imports `innkeeper` first (the CLI, `python -m
    innkeeper`, the server, `fit --measure`'s child, the tests), so doing it here covers them
    all. Only the library is mapped (a dlopen, a few ms on CPU builds), not the llama_cpp
    package, which imports numpy itself (after its library, so in the safe order). Same
    dlopen flags as llama_cpp's own CDLL, so its later load returns this very handle. A
    missing or broken build is left for the real import to report.
    """
    import ctypes
    import importlib.util
    import sys
    from pathlib import Path

    try:
        spec = importlib.util.find_spec("llama_cpp")
    except (ImportError, ValueError):
        return
    if spec is None or spec.origin is None:
        return
    names = {"win32": "llama.dll", "darwin": "libllama.dylib"}
    lib = Path(spec.origin).parent / "lib" / names.get(sys.platform, "libllama.so")
    if lib.exists():
        try:
            ctypes.CDLL(str(lib))
        except OSError:
            return


_load_llama_first()
