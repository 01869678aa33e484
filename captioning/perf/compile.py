"""The optional ``torch.compile`` paths (config ``train.compile``), applied in place. They compile
the reference teacher-forced loop of captioning/models/decoder.py: captioning/fast.py's pass is
eager-only, and the training module does not take it for a compiled run.

* ``"step"``: the attention and the LSTM cell, each with ``nn.Module.compile``: the same shapes at
  every step, so one small graph serves the whole caption (and decoding); compiles in seconds.
* ``"model"``: the whole forward, unrolled. Dynamo specialises on the number of steps, so each new
  padded length compiles a new graph (up to ``torch._dynamo.config.cache_size_limit``, then eager):
  for fixed-length benchmarks and GPU runs with ``train.compile_mode=reduce-overhead``.

Compilation is lazy (on the first call) and keeps parameter names, so checkpoints load eagerly.
"""

from __future__ import annotations

import functools

import torch

from captioning.console import InvalidValue
from captioning.config import COMPILE_TARGETS
from captioning.models.captioner import ShowAttendTell


def compile_model(model: ShowAttendTell, target: str, mode: str = "default") -> ShowAttendTell:
    """Compile ``target`` ("none", "step" or "model") of ``model`` in place; returns ``model``."""
    if target not in COMPILE_TARGETS:
        raise InvalidValue(f"unknown compile target '{target}'; choose one of {', '.join(COMPILE_TARGETS)}")
    if target == "step":
        model.decoder.attention.compile(mode=mode)
        model.decoder.lstm.compile(mode=mode)
    elif target == "model":
        model.compile(mode=mode)
    return model


@functools.lru_cache(maxsize=1)
def compile_unsupported_reason() -> str | None:
    """None if torch.compile works here (a C++ compiler on CPU, Triton on GPU), else why not, in one
    line. Compiles a two-op function once per process."""
    try:
        fn = torch.compile(lambda x: torch.tanh(x) * 2.0)
        out = fn(torch.ones(4))
        if not torch.allclose(out, torch.tanh(torch.ones(4)) * 2.0):
            return "torch.compile ran but gave a wrong result"
    except Exception as err:  # BackendCompilerFailed, missing compiler, unsupported platform
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        return f"torch.compile is not usable here: {type(err).__name__}: {first[:200]}"
    return None
