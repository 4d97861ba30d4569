"""The GPU bench: innkeeper against llama-server on an NVIDIA GPU, same build, same model.

`python -m bench.gpu` (what `make bench-gpu` calls) builds CUDA llama.cpp from the sources that
the pinned llama-cpp-python vendors (once, cached), writes models with real 8B/1B/135M shapes,
and compares. See bench/README.md, "On an NVIDIA GPU".
"""
