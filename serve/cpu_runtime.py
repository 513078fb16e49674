"""vLLM's recommended CPU runtime for the engine's processes: tcmalloc and Intel OpenMP preloaded.

vLLM's CPU guide asks for tcmalloc (the engine allocates and frees many small tensors per step) and, on x86,
Intel OpenMP (its threads are bound with KMP_AFFINITY and wait KMP_BLOCKTIME before sleeping) in LD_PRELOAD.
Preloading libiomp5 interposes the GOMP_* entry points torch's libgomp would serve, so torch's parallel
regions run on Intel OpenMP without a rebuild. On CPU vLLM starts its engine and worker with ``spawn``, so
LD_PRELOAD set in the server's environment before it starts them reaches both; the API server process itself
does no GEMMs and keeps the allocator it started with.

Thread binding is left to vLLM's ``VLLM_CPU_OMP_THREADS_BIND=auto`` unless the user sets it: auto is what
the guide recommends (one OpenMP thread per physical core, NUMA-local, and a core left to the API server and
scheduler), and vLLM binds Intel OpenMP's threads itself once it sees libiomp in LD_PRELOAD.

Missing pieces are notes, not errors: the server runs without them, only slower.
"""

from __future__ import annotations

import os
import platform
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

SWITCH = "MIXSPARSE_CPU_RUNTIME"  # "off": leave LD_PRELOAD as the user has it (comparisons, troubleshooting)
TCMALLOC_PACKAGE = "libtcmalloc-minimal4"  # Debian/Ubuntu
TCMALLOC_NAMES = ("libtcmalloc_minimal.so.4", "libtcmalloc_minimal.so", "libtcmalloc.so.4", "libtcmalloc.so")
OPENMP_MARKERS = ("libiomp", "libomp", "libgomp")  # vLLM refuses two OpenMP runtimes in LD_PRELOAD


@dataclass
class CpuRuntime:
    environment: dict[str, str] = field(default_factory=dict)  # to add to the server's environment
    preloaded: list[str] = field(default_factory=list)  # what was added, for the note
    notes: list[str] = field(default_factory=list)  # one line per missing piece
    applied: bool = True  # False where the user switched it off

    def summary(self) -> str:
        binding = self.environment.get("VLLM_CPU_OMP_THREADS_BIND") or os.environ.get("VLLM_CPU_OMP_THREADS_BIND")
        threads = (
            f"OpenMP threads bound to CPUs {binding}"
            if binding
            else "OpenMP threads bound by vLLM (one per physical core, one core left to the server)"
        )
        loaded = ", ".join(Path(p).name for p in self.preloaded) if self.preloaded else "nothing"
        return f"CPU runtime: preloaded {loaded}; {threads}"


def library_dirs() -> list[Path]:
    """Where the system's shared libraries live (Debian's multiarch directory first)."""
    dirs = []
    multiarch = sysconfig.get_config_var("MULTIARCH")
    for base in ("/usr/lib", "/lib", "/usr/local/lib"):
        if multiarch:
            dirs.append(Path(base) / multiarch)
        dirs.append(Path(base))
    dirs.append(Path("/usr/lib64"))
    return dirs


def find_tcmalloc(dirs: list[Path] | None = None) -> Path | None:
    for directory in library_dirs() if dirs is None else dirs:
        for name in TCMALLOC_NAMES:
            if (directory / name).is_file():
                return directory / name
    return None


def find_iomp(prefix: str | None = None) -> Path | None:
    """libiomp5.so from PyPI's ``intel-openmp``, which installs it into the environment's lib/."""
    path = Path(sys.prefix if prefix is None else prefix) / "lib" / "libiomp5.so"
    return path if path.is_file() else None


def cpu_runtime(
    environ: dict[str, str] | None = None,
    tcmalloc: Path | None = None,
    iomp: Path | None = None,
    machine: str | None = None,
) -> CpuRuntime:
    """What to add to the environment vLLM's CPU engine starts with; ``tcmalloc`` and ``iomp`` are the
    libraries found (None: absent), ``environ`` the environment as the user gave it."""
    environ = dict(os.environ if environ is None else environ)
    runtime = CpuRuntime()
    if environ.get(SWITCH, "").lower() in ("0", "off", "false", "no"):
        runtime.notes.append(f"CPU runtime left as the environment has it ({SWITCH}={environ[SWITCH]})")
        runtime.applied = False
        return runtime
    existing = [entry for entry in environ.get("LD_PRELOAD", "").replace(" ", ":").split(":") if entry]
    added = []
    if not any("libtcmalloc" in entry for entry in existing):
        if tcmalloc is not None:
            added.append(str(tcmalloc))
        else:
            runtime.notes.append(
                f"tcmalloc not found, so vLLM uses the default allocator (slower); install it with "
                f"`sudo apt-get install {TCMALLOC_PACKAGE}` (Debian/Ubuntu)"
            )
    x86 = (machine or platform.machine()).lower() in ("x86_64", "amd64")
    if x86 and not any(marker in entry for entry in existing for marker in OPENMP_MARKERS):
        if iomp is not None:
            added.append(str(iomp))
        else:
            runtime.notes.append(
                "Intel OpenMP not found in this environment, so torch's GNU OpenMP runs the engine; "
                "install it with `pip install intel-openmp` (`make install` does)"
            )
    if added:
        # ahead of the user's entries, as vLLM's guide prepends tcmalloc
        runtime.environment["LD_PRELOAD"] = ":".join(added + existing)
        runtime.preloaded = added
    return runtime
