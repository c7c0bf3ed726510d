"""Build hook: ship the CUDA sources in ``kernels/`` inside the wheel, as ``kappa_gpu/kernels/``.

Everything else about the package is declared in ``pyproject.toml``. The sources stay at the top
of the repository (``kernels/*.cu``, ``kernels/*.cuh``), where the nvcc tests and the benchmarks
read them from a checkout; a wheel must carry them as package data. ``build_py`` copies them into
``kappa_gpu/kernels/`` of the build tree, where ``kappa_gpu._cuda._cupy.kernel_dir()`` finds them
through ``importlib.resources``. Editable installs skip the copy: the loader reads
``<repo>/kernels/`` directly. ``MANIFEST.in`` puts them into the sdist, so a wheel built from the
sdist has them too.
"""

from __future__ import annotations

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

KERNELS = Path(__file__).resolve().parent / "kernels"
PATTERNS = ("*.cu", "*.cuh")
TARGET = ("kappa_gpu", "kernels")


def kernel_sources() -> list[Path]:
    files = sorted(f for pattern in PATTERNS for f in KERNELS.glob(pattern))
    if not files:
        raise FileNotFoundError(
            f"no CUDA sources ({', '.join(PATTERNS)}) in {KERNELS}: a kappa-gpu wheel needs them; "
            "build from a checkout or an sdist that includes kernels/"
        )
    return files


class build_py_with_kernels(build_py):
    """``build_py`` that also copies ``kernels/*.cu|*.cuh`` to ``kappa_gpu/kernels/``."""

    def _kernel_targets(self) -> list[tuple[Path, Path]]:
        if getattr(self, "editable_mode", False):
            return []
        dest = Path(self.build_lib, *TARGET)
        return [(f, dest / f.name) for f in kernel_sources()]

    def run(self) -> None:
        super().run()
        for src, dst in self._kernel_targets():
            self.mkpath(str(dst.parent))
            self.copy_file(str(src), str(dst), preserve_mode=False)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        return super().get_outputs(include_bytecode) + [str(d) for _, d in self._kernel_targets()]


setup(cmdclass={"build_py": build_py_with_kernels})
