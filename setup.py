"""Build memopt's optional native code; everything else lives in pyproject.toml.

Each extension in ``NATIVE`` is a plain C ABI shared library (no torch or Python headers;
memopt loads it with ctypes), so the build needs only a C++ compiler. The build is
tolerant: OpenMP is tried first, then a serial build, and if the compiler is missing or
fails the install still succeeds without the library; memopt then uses its pure-torch
fallbacks (``memopt.offload.cpu_adam.native_available()`` says which is in use).
``MEMOPT_NO_NATIVE=1`` skips the native build altogether.
"""

from __future__ import annotations

import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

NATIVE = [
    Extension(
        "memopt.offload._cpu_adam_lib",
        sources=[
            "csrc/cpu_adam/cpu_adam.cpp",
            "csrc/cpu_adam/lowrank_adam.cpp",
            "csrc/cpu_adam/lowbit_adam.cpp",
            "csrc/cpu_adam/channel_sumsq.cpp",
            "csrc/cpu_adam/bf16_gemm.cpp",
            "csrc/cpu_adam/projected_adam.cpp",
        ],
        depends=[
            "csrc/cpu_adam/cpu_adam_simd.h",
            "csrc/cpu_adam/lowp_scalar.h",
            "csrc/cpu_adam/clones.h",
            "csrc/cpu_adam/scratch.h",
        ],
        language="c++",
    ),
    Extension(
        "memopt.offload._aio_lib",
        sources=["csrc/aio/aio.cpp", "csrc/aio/copy_crc.cpp"],
        language="c++",
    ),
]

_BASE = ["-O3", "-std=c++17", "-fvisibility=hidden", "-fno-math-errno"]
_ATTEMPTS = [("OpenMP", ["-fopenmp"], ["-fopenmp"]), ("serial", [], [])]


class TolerantBuildExt(build_ext):
    """build_ext that never fails the install: OpenMP, then serial, then skip with a note."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # no compiler at all, or a broken toolchain
            _note(f"native build skipped ({exc}); memopt will use its torch fallbacks")

    def build_extensions(self) -> None:
        self._skipped: list[str] = []
        super().build_extensions()
        # Forget what did not build, so the editable copy and the wheel's file list skip it.
        self.extensions = [e for e in self.extensions if e.name not in self._skipped]

    def build_extension(self, ext: Extension) -> None:
        for label, cflags, lflags in _ATTEMPTS:
            ext.extra_compile_args = _BASE + cflags
            ext.extra_link_args = lflags
            try:
                super().build_extension(ext)
            except Exception as exc:
                _note(f"{ext.name}: {label} build failed ({exc})")
                continue
            _note(f"{ext.name}: built ({label})")
            return
        self._skipped.append(ext.name)
        _note(f"{ext.name}: not built; memopt will use its torch fallback")


def _note(message: str) -> None:
    print(f"[memopt setup] {message}", file=sys.stderr)


setup(
    ext_modules=[] if os.environ.get("MEMOPT_NO_NATIVE") == "1" else NATIVE,
    cmdclass={"build_ext": TolerantBuildExt},
)
