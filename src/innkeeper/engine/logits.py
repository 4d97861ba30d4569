"""Logits rows and candidate arrays as numpy, for the sampler's shortcuts (sampling.py).

llama-cpp-python's binding hands logits over as a float pointer and takes candidates as a
ctypes array built element by element; here both are numpy views and fills, so a token's
sampling work stays out of Python loops.
"""

from __future__ import annotations

import ctypes
from typing import Any

import llama_cpp as C
import numpy as np  # after llama_cpp: on CUDA builds numpy loaded first broke model loading

from innkeeper.engine.llama_params import BackendError

# llama_get_logits_ith returning the address as an int (llama-cpp-python's binding returns a
# float pointer, which costs a cast per call to turn into a numpy view).
_logits_address = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int32)(
    ("llama_get_logits_ith", C.llama_cpp._lib)
)


# llama_token_data as numpy lays it out: a candidate array filled without a Python loop.
TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])
assert TOKEN_DATA.itemsize == ctypes.sizeof(C.llama_token_data)


def sample_candidates(chain: Any, ids: np.ndarray, logits: np.ndarray) -> int:
    """Run a sampler chain over the candidates `ids` (ascending) with their `logits`, and
    accept the pick into it: what llama_sampler_sample does once it has built its candidate
    array from the whole vocabulary."""
    cand = np.empty(ids.size, dtype=TOKEN_DATA)
    cand["id"] = ids
    cand["logit"] = logits
    cand["p"] = 0.0
    arr = C.llama_token_data_array(
        cand.ctypes.data_as(ctypes.POINTER(C.llama_token_data)), ids.size, -1, False
    )
    C.llama_sampler_apply(chain, ctypes.byref(arr))
    if not 0 <= arr.selected < arr.size:
        raise BackendError("the sampler chain selected no token")
    token = int(arr.data[arr.selected].id)  # the samplers may have moved the data
    C.llama_sampler_accept(chain, token)
    return token


def logits_view(ctx_ptr: Any, index: int, n_vocab: int) -> np.ndarray:
    """The logits row of batch position `index` as a float32 numpy view (no copy; valid until
    the next decode). Every sampled token reads it: one call, one view."""
    address = _logits_address(ctx_ptr, index)
    if not address:
        raise BackendError(f"llama.cpp has no logits for batch position {index}")
    return np.frombuffer((ctypes.c_float * n_vocab).from_address(address), dtype=np.float32)
