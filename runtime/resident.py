"""What each serving process holds per vLLM layer, reported for the API server's /metrics.

vLLM loads weights in its worker processes while /metrics is served by the API-server process: each worker
writes one JSON file (``resident-<pid>.json``, atomically) into the directory named by
``$MIXSPARSE_STATS_DIR``, and the API server reads them all.
"""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path

from mixsparse.runtime.atomic import atomic_file

STATS_DIR = "MIXSPARSE_STATS_DIR"
_held: dict[str, dict] = {}  # this process's layers, rewritten whole on every report (layers load one by one)


def report(prefix: str, nbytes: int, dense_bytes: int, backend: str) -> None:
    """Record that this process holds ``nbytes`` for layer ``prefix`` (``dense_bytes`` if it were dense)."""
    _held[prefix] = {"bytes": nbytes, "dense_bytes": dense_bytes, "backend": backend}
    directory = os.environ.get(STATS_DIR)
    if directory:
        with atomic_file(Path(directory) / f"resident-{os.getpid()}.json", overwrite=True) as tmp:
            tmp.write_text(json.dumps(_held))


def read(directory: str | os.PathLike) -> dict[str, dict]:
    """Every process's report: {"resident-<pid>:<layer prefix>": {bytes, dense_bytes, backend}}."""
    found = {}
    for path in glob.glob(str(Path(directory) / "resident-*.json")):
        try:
            with open(path) as handle:
                for prefix, entry in json.load(handle).items():
                    found[f"{Path(path).stem}:{prefix}"] = entry
        except (OSError, json.JSONDecodeError):
            continue  # being replaced right now; next sample
    return found
