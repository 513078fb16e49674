"""Builds the native CPU kernels (mixsparse.runtime._cpu_sparse) through torch's extension tooling.

Metadata lives in pyproject.toml; this file only adds the extension. Each instruction-set variant is
compiled from its own file with its own target flags (never -march=native), and the op picks one at run
time from what the CPU reports, so a build on an AVX-512 machine still runs on a CPU without it.
The extension is optional: where it cannot be built (no compiler, no torch at build time) the install
still succeeds and the runtime uses the exact dense fallback with one warning saying why.
Build with torch already installed and `pip install --no-build-isolation` (what `make install` does).
"""

import sys

from setuptools import setup

CSRC = "csrc/cpu"
# (variant, source, compiler flags, macro the op is built with when the variant compiled)
VARIANTS = [
    (
        "avx512",
        f"{CSRC}/sparse_kernels_avx512.cpp",
        ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16", "-mavx512vbmi2", "-mfma"],
        "MIXSPARSE_HAS_AVX512",
    ),
]
# -fno-wrapv undoes the -fwrapv that Python's own CFLAGS put first: with wrapping signed arithmetic GCC keeps
# the kernels' index math in a form that measured 2.3x slower at 8 tokens (benchmarks/cpu_gemm.py)
COMMON_FLAGS = ["-O3", "-fno-wrapv", "-fPIC"]
OP_FLAGS = ["-std=c++20"]  # torch 2.13's headers use C++20 features
VARIANT_FLAGS = ["-std=c++17"]  # the variant files include no torch header


def extension_setup() -> dict:
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        print(
            "mixsparse: torch is not importable at build time; the native CPU kernels are not built "
            "(install torch first and use `pip install --no-build-isolation`)",
            file=sys.stderr,
        )
        return {}

    class BuildWithVariants(BuildExtension):
        """Compiles each variant's file with its flags into objects linked into the extension."""

        def build_extension(self, ext):
            from setuptools.errors import CompileError

            objects = []
            for name, source, flags, macro in VARIANTS:
                try:
                    objects += self.compiler.compile(
                        [source],
                        output_dir=self.build_temp,
                        include_dirs=[CSRC],
                        extra_postargs=COMMON_FLAGS + VARIANT_FLAGS + flags,
                    )
                except CompileError as error:
                    print(
                        f"mixsparse: the {name} kernels did not compile ({error}); the portable ones remain",
                        file=sys.stderr,
                    )
                    continue
                ext.define_macros.append((macro, "1"))
            ext.extra_objects = [*ext.extra_objects, *objects]
            super().build_extension(ext)

    extension = CppExtension(
        "mixsparse.runtime._cpu_sparse",
        [f"{CSRC}/sparse_linear.cpp"],
        include_dirs=[CSRC],
        extra_compile_args=COMMON_FLAGS + OP_FLAGS,
        optional=True,  # a failed build warns and installs the rest: the dense fallback then runs
    )
    return {"ext_modules": [extension], "cmdclass": {"build_ext": BuildWithVariants.with_options(use_ninja=False)}}


setup(**extension_setup())
