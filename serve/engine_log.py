"""vLLM's output in a log file, the terminal kept for what the user needs: the URL, and a real error.

vLLM logs from three processes (API server, engine core, worker) and C++ libraries write to the file
descriptors directly, so Python logging handlers cannot catch it all: the server's stdout and stderr
descriptors are pointed at the log before vLLM starts, and its engine processes inherit them. The terminal
keeps a duplicate of the original descriptor for mixsparse's own lines.
"""

from __future__ import annotations

import os
import re
import sys
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from mixsparse.runtime.cache import cache_dir

# "ValueError: ...", with or without vLLM's "(EngineCore pid=12) " prefix
EXCEPTION = re.compile(r"^(?:\(\w+ pid=\d+\) )?((?:[A-Za-z_][\w.]*\.)?[A-Za-z_]\w*(?:Error|Exception)): (.+)$")
# the line under a pydantic ValidationError that says why: "  Value error, <why> [type=value_error, ...]"
DETAIL = re.compile(r"^(?:\(\w+ pid=\d+\) )?\s*(?:Value error|Assertion failed), (.+?)(?: \[type=.*)?$")
# what vLLM's API server raises after the engine process failed; the engine's own error says why
WRAPPERS = ("Engine core initialization failed",)


def default_log(name: str, port: int) -> Path:
    return cache_dir() / "logs" / f"serve-{name}-{port}.log"


def error_line(text: str) -> str | None:
    """The exception that stopped the server, from its log: the last one raised, unless it only says
    that another process failed. A pydantic error (vLLM's config checks) says what is wrong on a later line."""
    found = []
    lines = text.splitlines()
    for index, line in enumerate(lines):
        match = EXCEPTION.match(line.strip())
        if match:
            message = match.group(2).strip()
            for detail in lines[index + 1 : index + 6]:
                reason = DETAIL.match(detail)
                if match.group(1).endswith("ValidationError") and reason:
                    message = reason.group(1)
                    break
            found.append(f"{match.group(1)}: {message}")
    causes = [line for line in found if not any(wrapper in line for wrapper in WRAPPERS)]
    return (causes or found or [None])[-1]


@contextmanager
def redirected(path: Path, append: bool = False):
    """Point this process's stdout and stderr (and its future children's) at ``path``; yields a text stream
    to the terminal. ``append`` keeps what the file holds (a caller that logs there too)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    log = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | (0 if append else os.O_TRUNC), 0o644)
    saved = os.dup(1), os.dup(2)
    terminal = os.fdopen(os.dup(saved[0]), "w", buffering=1)
    try:
        os.dup2(log, 1)
        os.dup2(log, 2)
        yield terminal
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, log):
            os.close(fd)
        terminal.close()


def local_url(host: str, port: int) -> str:
    """Where this machine reaches a server listening on ``host``."""
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def announce_when_ready(url: str, line, write, stop: threading.Event, poll: float = 1.0) -> threading.Thread:
    """Write ``line()`` once ``url``/health answers (a daemon thread; ``stop`` ends it early)."""

    def wait() -> None:
        while not stop.is_set():
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5):
                    pass
                write(line())
                return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                stop.wait(poll)

    thread = threading.Thread(target=wait, name="mixsparse-ready", daemon=True)
    thread.start()
    return thread


def elapsed(start: float) -> str:
    return f"{time.monotonic() - start:.0f} s"
