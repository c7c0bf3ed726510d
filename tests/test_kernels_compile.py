"""Every CUDA source compiles, offline (nvcc -ptx) and the way it runs (NVRTC through CuPy).

No GPU is needed: nvcc and NVRTC compile for a named architecture without a device. Each test
skips, saying why, where its compiler is absent.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import torch

from kappa_gpu._cuda import _cupy

NVCC = shutil.which("nvcc")
KERNEL_DIR = _cupy.kernel_dir()
CU_FILES = sorted(p.name for p in KERNEL_DIR.iterdir() if p.name.endswith(".cu"))
#: explicit instantiations under KG_INSTANTIATE: 9 passes x flat/strided x 3 dtype pairs (the
#: mixed pairs are compiled by the NVRTC test below)
N_ENTRIES = 9 * 2 * 3


def test_every_source_is_known_to_the_loader():
    names = sorted(p.name for p in KERNEL_DIR.iterdir() if p.suffix in (".cu", ".cuh"))
    assert names == sorted(_cupy.KERNEL_FILES)
    src = _cupy.module_source()
    assert '#include "' not in src  # local includes inlined, once
    assert src.count("#define KG_COMMON_CUH") == 1


ARCHS = ["sm_80", "sm_90"]


@pytest.fixture(scope="module")
def ptx_builds(tmp_path_factory):
    """Start every (source, architecture) nvcc build at once; each test waits for its own."""
    d = tmp_path_factory.mktemp("ptx")
    procs = {}
    for cu in CU_FILES:
        for arch in ARCHS:
            out = d / f"{cu}.{arch}.ptx"
            cmd = [
                NVCC,
                "-ptx",
                f"-arch={arch}",
                "-std=c++17",
                "-DKG_INSTANTIATE",
                "-Werror",
                "all-warnings",
                str(KERNEL_DIR / cu),
                "-o",
                str(out),
            ]
            procs[(cu, arch)] = (
                out,
                subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
            )
    yield procs
    for _, p in procs.values():
        if p.poll() is None:
            p.kill()


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("cu", CU_FILES)
def test_nvcc_compiles_to_ptx(cu, arch, ptx_builds):
    out, proc = ptx_builds[(cu, arch)]
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-4000:]
    entries = re.findall(r"^\.visible \.entry (\S+)\(", out.read_text(), re.MULTILINE)
    assert len(entries) == N_ENTRIES, entries[:5]
    assert all("kg_block" in e for e in entries)


def _nvrtc_compiler():
    try:
        from cupy.cuda import compiler
        from cupy_backends.cuda.libs import nvrtc

        nvrtc.getVersion()
    except Exception as err:  # not installed, or no NVRTC library
        pytest.skip(f"CuPy with NVRTC is not available here ({type(err).__name__}: {err})")
    if not hasattr(compiler, "_get_arch_for_options_for_nvrtc"):
        pytest.skip("this CuPy has no _get_arch_for_options_for_nvrtc to pin the architecture")
    return compiler


@pytest.mark.parametrize(
    "arch, tdtype, cdtype",
    [("90", torch.float32, torch.float64), ("80", torch.bfloat16, torch.float32)],
)
def test_nvrtc_compiles_the_module_the_loader_builds(arch, tdtype, cdtype, monkeypatch):
    """The exact source, options and name expressions of ``_cupy.get_kernel``, through NVRTC.

    CuPy asks the device for its architecture; with no device, the architecture is pinned.
    """
    compiler = _nvrtc_compiler()
    monkeypatch.setattr(
        compiler, "_get_arch_for_options_for_nvrtc", lambda a: (f"-arch=sm_{a}", "cubin")
    )
    names = _cupy.name_expressions(tdtype, cdtype)
    binary, mapping = compiler.compile_using_nvrtc(
        _cupy.module_source(), _cupy.nvrtc_options(), arch=arch, name_expressions=names
    )
    assert len(binary) > 0
    assert sorted(mapping) == sorted(names)
    assert all(m.startswith("_Z8kg_block") for m in mapping.values())
