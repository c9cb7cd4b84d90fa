"""Build of the native ops: setuptools drives the top-level CMakeLists.txt (metadata: pyproject.toml).

``pip install -e .`` / ``pip install .`` run :class:`CMakeBuild`, which configures and builds
``CMakeLists.txt`` with the interpreter doing the build, so the library is compiled against the
torch that interpreter imports (pyproject.toml's build requirements pin the same torch as the
runtime dependency; with ``--no-build-isolation`` it is the environment's own torch). The
library lands at ``gnr_fast/_native<EXT_SUFFIX>`` with a ``.torch-version`` stamp beside it.

When cmake or a C++ compiler is missing, or ``GNR_FAST_BUILD_NATIVE=0`` is set, the build
is skipped with a warning and gnr_fast uses its pure-torch paths (``gnr-fast doctor`` says why).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
STAMP = ".torch-version"  # written by CMakeLists.txt beside the library


class CMakeExtension(Extension):
    """An extension whose file is produced by CMake (no sources for setuptools to compile)."""

    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    """Runs ``cmake -S . -B <build_temp>`` and ``cmake --build`` for each :class:`CMakeExtension`."""

    def run(self) -> None:
        skip = self._skip_reason()
        if skip is not None:
            self.announce(f"gnr-fast: not building the native ops: {skip}", level=3)
            sys.stderr.write(f"WARNING: gnr-fast: not building the native ops: {skip}\n")
            return
        super().run()

    def _skip_reason(self) -> str | None:
        if os.environ.get("GNR_FAST_BUILD_NATIVE", "1") == "0":
            return "GNR_FAST_BUILD_NATIVE=0"
        if shutil.which("cmake") is None:
            return "cmake is not on PATH"
        if shutil.which(os.environ.get("CXX", "c++")) is None:
            return "no C++ compiler (c++ / $CXX) on PATH"
        return None

    def build_extension(self, ext: Extension) -> None:
        output = Path(self.get_ext_fullpath(ext.name)).resolve()
        output.parent.mkdir(parents=True, exist_ok=True)
        build_dir = Path(self.build_temp).resolve() / "cmake"
        configure = [
            "cmake", "-S", str(ROOT), "-B", str(build_dir),
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DGNR_FAST_OUTPUT_DIR={output.parent}",
            f"-DGNR_FAST_OUTPUT_NAME={output.name}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        if shutil.which("ninja"):
            configure += ["-G", "Ninja"]
        subprocess.run(configure, check=True)
        subprocess.run(["cmake", "--build", str(build_dir), "--parallel", str(os.cpu_count() or 1)], check=True)

    def get_outputs(self) -> list[str]:
        """The libraries and their torch-version stamps (so wheels and editable installs carry both)."""
        outputs = super().get_outputs()
        return outputs + [path + STAMP for path in outputs if os.path.exists(path + STAMP)]

    def copy_extensions_to_source(self) -> None:
        """Editable installs: copy each library's stamp into the source tree beside the library."""
        super().copy_extensions_to_source()
        build_py = self.get_finalized_command("build_py")
        for ext in self.extensions:
            inplace_file, regular_file = self._get_inplace_equivalent(build_py, ext)
            if os.path.exists(regular_file + STAMP):
                self.copy_file(regular_file + STAMP, inplace_file + STAMP, level=self.verbose)


setup(
    ext_modules=[CMakeExtension("gnr_fast._native")],
    cmdclass={"build_ext": CMakeBuild},
)
