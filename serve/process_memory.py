"""What a served model's processes hold: the RSS of a process and its children, each under a readable label,
and the GPU memory in use, sampled in a thread. ``bench`` keeps the peaks; the soak benchmark keeps every
sample to see whether memory stays flat."""

from __future__ import annotations

import os
import threading
import time


def role(process) -> str:
    """A readable name for a server process: vLLM names its engine processes (VLLM::EngineCore, ...)."""
    try:
        name = process.name()
        cmdline = " ".join(process.cmdline())
    except Exception:
        return "?"
    if "mixsparse.serve.cli" in cmdline:
        return "api-server"
    return name.removeprefix("VLLM::") or "?"


class ProcessMemory:
    """RSS per process of the tree under ``pid`` and GPU memory in use, every ``interval`` seconds; the peaks
    always, every sample ([(t, {label: bytes})]) when ``keep_samples``."""

    def __init__(self, pid: int, interval: float = 0.5, keep_samples: bool = False):
        self.pid = pid
        self.interval = interval
        self.keep_samples = keep_samples
        self.samples: list[tuple[float, dict[str, int]]] = []
        self.labels: dict[int, str] = {}
        self.peak_rss = 0
        self.peak_gpu: int | None = None
        self.t0 = time.monotonic()
        self._gpu = _gpu_handles()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> dict[str, int]:
        import psutil

        found: dict[str, int] = {}
        try:
            root = psutil.Process(self.pid)
            processes = [root, *root.children(recursive=True)]
        except psutil.Error:  # the server is gone: nothing to sample
            return found
        for process in processes:
            try:
                rss = process.memory_info().rss
            except psutil.Error:
                continue
            if process.pid not in self.labels:
                label = role(process)
                self.labels[process.pid] = label if label not in self.labels.values() else f"{label}-{process.pid}"
            found[self.labels[process.pid]] = rss
        self.peak_rss = max(self.peak_rss, sum(found.values()))
        if self._gpu:
            import pynvml

            used = sum(pynvml.nvmlDeviceGetMemoryInfo(h).used for h in self._gpu)
            self.peak_gpu = max(self.peak_gpu or 0, used)
        if self.keep_samples:
            self.samples.append((time.monotonic() - self.t0, found))
        return found

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def start(self) -> "ProcessMemory":
        self.sample()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def __enter__(self) -> "ProcessMemory":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _gpu_handles() -> list:
    try:
        import pynvml

        pynvml.nvmlInit()
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        indices = (
            [int(i) for i in visible.split(",") if i.strip().isdigit()]
            if visible
            else range(pynvml.nvmlDeviceGetCount())
        )
        return [pynvml.nvmlDeviceGetHandleByIndex(i) for i in indices]
    except Exception:  # no NVML (CPU machine): GPU memory is not reported
        return []
