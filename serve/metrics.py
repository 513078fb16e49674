"""mixsparse's gauges on vLLM's /metrics (API-server process, default prometheus registry).

- ``mixsparse_weight_bytes{kind}``, one definition for the memory gauges: ``dense_equivalent`` and
  ``resident`` count in the serving dtype (``--dtype``; the stored dtype when it is ``auto``), so they
  compare with what a dense server of the same model holds, whatever the dtype. ``dense_equivalent`` is
  every weight of the model dense; ``resident`` is what the serving processes hold: that, minus what each
  compressed layer saves, as the workers report it after loading (equal to it on the dense fallback).
  ``stored`` is the artifact's bytes on disk (safetensors headers, stored dtype); it compares with
  ``dense_equivalent`` only when the two dtypes agree (the default: bfloat16 on CPUs that have it).
- ``mixsparse_sparse_modules{format}``: decoder linears per format (2:4 packed, unstructured, dense);
  ``mixsparse_kernel_layers{backend}``: vLLM layers per GEMM backend (cusparselt, cutlass, dense fallback).
- ``mixsparse_weight_memory_ratio``: exactly resident / dense_equivalent of the gauge above (1.0 for a
  dense model or the dense fallback, below 1 where compressed layers stay compressed).
- ``mixsparse_linear_memory_ratio``: the same for the linear layers vLLM builds alone (what sparsity can
  compress; embeddings excluded): 0.5625 for all-2:4 bf16 layers held packed, 1.0 on the dense fallback.
- ``mixsparse_tokens_per_second{phase=prompt|generation}``: rate of vLLM's token counters over a sliding
  window; 0 once the server has been idle for a window.
- ``mixsparse_throughput_gain_ratio``: sparse/dense output tokens/s measured by ``mixsparse bench`` and
  recorded in the artifact (bench.json); absent until then.
"""

from __future__ import annotations

import collections
import json
import os
import threading
import time
from pathlib import Path

from prometheus_client import REGISTRY, Gauge

from mixsparse.runtime import resident
from mixsparse.runtime.formats import artifact

BENCH_RECORD = "bench.json"
_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "half": 2, "float32": 4, "float": 4}


class Rates:
    """Tokens/s from monotonically increasing counters, over a sliding time window."""

    def __init__(self, window: float):
        self.window = window
        self.samples: collections.deque = collections.deque()

    def add(self, now: float, prompt: float, generation: float) -> tuple[float, float]:
        self.samples.append((now, prompt, generation))
        while len(self.samples) > 2 and self.samples[1][0] <= now - self.window:
            self.samples.popleft()
        first, last = self.samples[0], self.samples[-1]
        span = last[0] - first[0]
        if span <= 0:
            return 0.0, 0.0
        return (last[1] - first[1]) / span, (last[2] - first[2]) / span


def vllm_token_counters(registry=REGISTRY) -> tuple[float, float]:
    """(prompt tokens, generation tokens) so far, summed over vLLM's engines and models."""
    totals = {"vllm:prompt_tokens_total": 0.0, "vllm:generation_tokens_total": 0.0}
    for family in registry.collect():
        for sample in family.samples:
            if sample.name in totals:
                totals[sample.name] += sample.value
    return totals["vllm:prompt_tokens_total"], totals["vllm:generation_tokens_total"]


class Metrics:
    def __init__(
        self,
        model_dir: str | os.PathLike,
        stats_dir: str | os.PathLike,
        serving_dtype: str | None,
        window: float = 10.0,
        interval: float = 1.0,
        registry=REGISTRY,
    ):
        self.model_dir = Path(model_dir)
        self.stats_dir = Path(stats_dir)
        self.interval = interval
        self.rates = Rates(window)
        self.registry = registry
        self.bytes = Gauge(
            "mixsparse_weight_bytes",
            "Model weight bytes: dense_equivalent (every weight dense) and "
            "resident (held while serving), both in the serving dtype; stored (artifact on disk, "
            "stored dtype)",
            ["kind"],
            registry=registry,
            multiprocess_mode="mostrecent",
        )
        self.modules = Gauge(
            "mixsparse_sparse_modules",
            "Decoder linear modules per format",
            ["format"],
            registry=registry,
            multiprocess_mode="mostrecent",
        )
        self.kernels = Gauge(
            "mixsparse_kernel_layers",
            "vLLM linear layers per GEMM backend",
            ["backend"],
            registry=registry,
            multiprocess_mode="mostrecent",
        )
        self.ratio = Gauge(
            "mixsparse_weight_memory_ratio",
            "mixsparse_weight_bytes resident / dense_equivalent",
            registry=registry,
            multiprocess_mode="mostrecent",
        )
        self.linear_ratio = Gauge(
            "mixsparse_linear_memory_ratio",
            "Resident / dense bytes of the linear layers (serving dtype)",
            registry=registry,
            multiprocess_mode="mostrecent",
        )
        self.speed = Gauge(
            "mixsparse_tokens_per_second",
            "Tokens/s over the sliding window",
            ["phase"],
            registry=registry,
            multiprocess_mode="mostrecent",
        )
        self.gain = None
        self.static = self._static(serving_dtype)
        self.bytes.labels("dense_equivalent").set(self.static["serving_dense"])
        self.bytes.labels("stored").set(self.static["stored"])
        for fmt, count in self.static["formats"].items():
            self.modules.labels(fmt).set(count)
        self.speed.labels("prompt").set(0)
        self.speed.labels("generation").set(0)
        record = self.model_dir / BENCH_RECORD
        if record.is_file():
            ratio = json.loads(record.read_text()).get("output_tokens_per_second_ratio")
            if ratio is not None:
                self.gain = Gauge(
                    "mixsparse_throughput_gain_ratio",
                    "Sparse/dense output tokens/s measured by mixsparse bench",
                    registry=registry,
                    multiprocess_mode="mostrecent",
                )
                self.gain.set(ratio)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mixsparse-metrics", daemon=True)

    def _static(self, serving_dtype: str | None) -> dict:
        if artifact.is_artifact(self.model_dir):
            config = artifact.read_config(self.model_dir)
            sizes = artifact.weight_bytes(config)
            element = config.dtype.itemsize
            linears = sum(len(g) for g in config.groups)
            formats = collections.Counter(
                "2:4"
                if e.storage == artifact.PACKED24
                else ("unstructured" if e.format == "unstructured" else e.format)
                for e in config.modules.values()
            )
            formats["dense"] = linears - len(config.modules)
        else:
            files = sorted(self.model_dir.glob("*.safetensors"))
            from safetensors import safe_open

            total, element = 0, 2
            for file in files:
                with safe_open(file, framework="pt") as handle:
                    for key in handle.keys():
                        tensor = handle.get_slice(key)
                        count = 1
                        for size in tensor.get_shape():
                            count *= size
                        element = artifact._DTYPE_BYTES[tensor.get_dtype()]
                        total += count * element
            sizes = {"stored": total, "dense_equivalent": total}
            formats = collections.Counter({"2:4": 0})
        serving = _DTYPE_BYTES.get(serving_dtype or "", element)
        return {**sizes, "formats": dict(formats), "serving_dense": sizes["dense_equivalent"] * serving // element}

    def reports(self) -> dict[str, dict]:
        """What the workers reported: {layer prefix (per process): {bytes, dense_bytes, backend}}."""
        return resident.read(self.stats_dir)

    def update(self) -> None:
        prompt, generation = vllm_token_counters(self.registry)
        prompt_rate, generation_rate = self.rates.add(time.monotonic(), prompt, generation)
        self.speed.labels("prompt").set(prompt_rate)
        self.speed.labels("generation").set(generation_rate)
        reports = self.reports()
        if not reports and not self.static["formats"].get("2:4") and not artifact.is_artifact(self.model_dir):
            self.bytes.labels("resident").set(self.static["serving_dense"])  # a plain dense model
            self.ratio.set(1.0)
        if reports:
            saved = sum(e["dense_bytes"] - e["bytes"] for e in reports.values())
            resident = self.static["serving_dense"] - saved
            self.bytes.labels("resident").set(resident)
            self.ratio.set(resident / self.static["serving_dense"])
            self.linear_ratio.set(
                sum(e["bytes"] for e in reports.values()) / max(1, sum(e["dense_bytes"] for e in reports.values()))
            )
            for backend, count in collections.Counter(e["backend"] for e in reports.values()).items():
                self.kernels.labels(backend).set(count)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.update()
            except Exception:  # metrics must never take the server down
                continue

    def start(self) -> "Metrics":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
