"""Device and dtype selection: CUDA + bf16 when present, else CPU + fp32."""

from __future__ import annotations

import torch

from .errors import InputError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def quiet_libraries() -> None:
    """No tokenizers fork warnings, transformers log lines or progress bars in a command's output."""
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        from datasets.utils.logging import disable_progress_bar

        disable_progress_bar()
    except ImportError:
        pass


def allocator_defaults() -> None:
    """CUDA's caching allocator with expandable segments unless the user set PYTORCH_CUDA_ALLOC_CONF: a
    surgery's mixed tensor sizes otherwise leave fragments (bloom-7b1 with the paper's recipe: 16.0 GiB
    reserved for 15.2 GiB in use). Must run before CUDA is first used."""
    import os

    if not (os.environ.get("PYTORCH_CUDA_ALLOC_CONF") or os.environ.get("PYTORCH_ALLOC_CONF")):
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"


def resolve_device(device: str | None = None) -> torch.device:
    """`None`/"auto" picks CUDA when available, else CPU; "cuda" without a GPU is an error."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for but no CUDA GPU is visible: use --device cpu")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise InputError(f"unknown device {device!r}: use cpu, cuda or cuda:N") from exc


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    """`None`/"auto" gives bf16 on CUDA and fp32 on CPU."""
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise InputError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]
