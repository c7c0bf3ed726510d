"""Backend choice: torch on CPU (and why, in the debug log); CuPy that cannot run costs one
warning and falls back, never a crash; clear errors for what cannot work; finding the sources.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch

from kappa_gpu._cuda import BlockParams, UpdateBlocks, _cupy, _dispatch, resolve_backend
from kappa_gpu._cuda._cases import assert_close, make_case

CUDA = torch.device("cuda", 0)  # a device object needs no GPU: the choice is made before use


def fake_cupy_without_nvrtc(monkeypatch) -> list:
    """A CuPy that sees a CUDA device but cannot compile (no NVRTC): every choice sees CUDA
    tensors, ``get_kernel`` raises. Returns the list of attempted compiles."""
    real = _dispatch.resolve_backend
    # the tensors are on the CPU here: let the choice see CUDA tensors and a working CuPy
    monkeypatch.setattr(_dispatch, "resolve_backend", lambda b, d, dt=(): real(b, CUDA, dt))
    monkeypatch.setattr(_cupy, "_STATUS", _cupy.CupyStatus(True, True, "CuPy 0.fake"))
    calls: list = []

    def no_nvrtc(*args, **kwargs):
        calls.append(args)
        raise OSError("libnvrtc.so.13: cannot open shared object file")

    monkeypatch.setattr(_cupy, "get_kernel", no_nvrtc)
    return calls


@pytest.fixture
def fresh(monkeypatch):
    """Forget the process-wide CuPy probe and the warn-once flag for one test."""
    monkeypatch.setattr(_cupy, "_STATUS", None)
    monkeypatch.setattr(_dispatch, "_warned", False)


def _fake_cupy(monkeypatch, *, device_count=None, error=None):
    """Install a fake ``cupy`` whose runtime reports ``device_count`` or raises ``error``."""

    def count():
        if error is not None:
            raise error
        return device_count

    runtime = types.SimpleNamespace(getDeviceCount=count)
    fake = types.ModuleType("cupy")
    fake.__version__ = "0.fake"
    fake.cuda = types.SimpleNamespace(runtime=runtime)
    monkeypatch.setitem(sys.modules, "cupy", fake)


def test_auto_on_cpu_chooses_torch_and_says_why(caplog, gen):
    case = make_case("order2", 10, None, torch.float32, gen)
    blocks = UpdateBlocks(case.params, case.coef)
    with caplog.at_level(logging.DEBUG, logger="kappa_gpu"):
        y = blocks.matvec(case.ins["fwd"][:2], case.ins["fwd"][2])
    assert blocks.last_backend == "torch"
    msgs = [r.getMessage() for r in caplog.records if r.name == "kappa_gpu"]
    assert any("torch path" in m and "on cpu" in m and "CUDA tensors" in m for m in msgs), msgs
    want = UpdateBlocks(case.params, case.coef, backend="torch").matvec(
        case.ins["fwd"][:2], case.ins["fwd"][2]
    )
    for g, w in zip(y, want, strict=True):
        assert torch.equal(g, w)
    # logged once per change of decision, not once per product
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="kappa_gpu"):
        blocks.matvec(case.ins["fwd"][:2], case.ins["fwd"][2])
    assert not [r for r in caplog.records if r.name == "kappa_gpu"]


def test_explicit_backends():
    assert resolve_backend("torch", "cpu")[0] == "torch"
    assert resolve_backend("torch", CUDA)[0] == "torch"
    assert resolve_backend("auto", "cpu") == (
        "torch",
        "the tensors are on cpu; the fused CuPy kernels need CUDA tensors",
    )
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend("triton", "cpu")
    with pytest.raises(ValueError, match="backend must be one of"):
        UpdateBlocks(BlockParams.order1([3], Da=0.1), backend="gpu")
    with pytest.raises(ValueError, match="runs on CUDA tensors only; these are on cpu"):
        resolve_backend("cupy", "cpu")
    params = BlockParams.order1([4], Da=0.1)
    with pytest.raises(ValueError, match="CUDA tensors only"):
        UpdateBlocks(params, backend="cupy").rmatvec_pre([torch.ones(4)])


def test_unsupported_dtype_falls_back_without_probing_cupy(fresh, monkeypatch):
    def boom():
        raise AssertionError("CuPy must not be imported for a dtype it cannot take")

    monkeypatch.setattr(_cupy, "_import_cupy", boom)
    backend, reason = resolve_backend("auto", CUDA, [torch.float16])
    assert backend == "torch" and "float16 has no fused kernel" in reason
    with pytest.raises(TypeError, match="kernels for float32, float64, bfloat16 only"):
        resolve_backend("cupy", CUDA, [torch.float16])


def test_cupy_not_installed_is_silent(fresh, monkeypatch):
    def missing():
        raise ImportError("No module named 'cupy'")

    monkeypatch.setattr(_cupy, "_import_cupy", missing)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        backend, reason = resolve_backend("auto", CUDA, [torch.float32])
    assert backend == "torch" and "not installed" in reason and "kappa-gpu[cuda]" in reason
    with pytest.raises(RuntimeError, match="backend='cupy' cannot run: CuPy is not installed"):
        resolve_backend("cupy", CUDA, [torch.float32])


@pytest.mark.parametrize(
    "setup",
    [
        dict(error=RuntimeError("cudaErrorInsufficientDriver: CUDA driver version is too old")),
        dict(device_count=0),
    ],
    ids=["no-driver", "no-device"],
)
def test_broken_cupy_warns_once_and_falls_back(fresh, monkeypatch, setup):
    _fake_cupy(monkeypatch, **setup)
    with pytest.warns(RuntimeWarning, match="CuPy is installed but cannot run") as rec:
        first = resolve_backend("auto", CUDA, [torch.float32])
    assert len(rec) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second warning would raise here
        second = resolve_backend("auto", torch.device("cuda", 1), [torch.bfloat16])
    assert first[0] == second[0] == "torch"
    assert "0.fake" in first[1]
    with pytest.raises(RuntimeError, match="backend='cupy' cannot run: CuPy 0.fake"):
        resolve_backend("cupy", CUDA, [torch.float32])


@pytest.mark.skipif(
    importlib.util.find_spec("cupy") is None or torch.cuda.is_available(),
    reason="needs CuPy installed on a machine without a usable CUDA device",
)
def test_real_cupy_without_a_gpu_warns_once_and_falls_back(fresh):
    """The real package (e.g. pip install cupy-cuda13x) on this GPU-less machine."""
    st = _cupy.status()
    assert st.installed and not st.usable
    with pytest.warns(RuntimeWarning, match="cannot run the fused kernels") as rec:
        assert resolve_backend("auto", CUDA, [torch.float32])[0] == "torch"
        assert resolve_backend("auto", CUDA, [torch.float32])[0] == "torch"
    assert len(rec) == 1


def test_compile_failure_falls_back_once_then_stays_on_torch(fresh, monkeypatch, gen):
    """A CuPy that sees a device but cannot compile (e.g. no NVRTC): one warning, torch results,
    and no second attempt."""
    calls = fake_cupy_without_nvrtc(monkeypatch)
    case = make_case("adam_full", 20, 2, torch.float32, gen)
    blocks = UpdateBlocks(case.params, case.coef)
    ins = case.ins["post"]
    with pytest.warns(RuntimeWarning, match="compiling the fused kernels failed: OSError") as rec:
        got = blocks.rmatvec_post(ins[:3], ins[3])
        blocks.rmatvec_post(ins[:3], ins[3])
    assert len(rec) == 1 and len(calls) == 1
    assert blocks.last_backend == "torch" and "libnvrtc" in blocks.last_reason
    want = UpdateBlocks(case.params, case.coef, backend="torch").rmatvec_post(ins[:3], ins[3])
    for g, w in zip(got, want, strict=True):
        assert_close(g, w, ins, "adam_full")
    # backend="cupy" now says why it cannot run
    with pytest.raises(RuntimeError, match="backend='cupy' cannot run: compiling the fused"):
        UpdateBlocks(case.params, case.coef, backend="cupy").rmatvec_post(ins[:3], ins[3])


def test_compile_failure_with_backend_cupy_is_an_error(fresh, monkeypatch, gen):
    monkeypatch.setattr(_dispatch, "resolve_backend", lambda b, d, dt=(): ("cupy", "pretend"))

    def no_nvrtc(*args, **kwargs):
        raise OSError("libnvrtc.so.13: cannot open shared object file")

    monkeypatch.setattr(_cupy, "get_kernel", no_nvrtc)
    case = make_case("order1", 20, None, torch.float32, gen)
    with pytest.raises(RuntimeError, match="backend='cupy' cannot run: compiling"):
        UpdateBlocks(case.params, backend="cupy").rmatvec_pre(case.ins["pre"])


def test_update_blocks_checks_its_coefficients():
    p2 = BlockParams.order2([5], a=0.1, a2=0.1, b=0.9, beta=0.9)
    with pytest.raises(ValueError, match="coefficient 'D' must be a \\(5,\\) tensor"):
        UpdateBlocks(p2, [torch.ones(4)])
    pf = BlockParams.adam_full([5], a=0.1, b1=0.9, b2=0.99)
    with pytest.raises(ValueError, match="\\('D', 'q', 'r'\\) \\(required\\), got 1"):
        UpdateBlocks(pf, [torch.ones(5)])
    with pytest.raises(TypeError, match="params must be a BlockParams"):
        UpdateBlocks({"kind": "order1"})
    blocks = UpdateBlocks(p2, [torch.ones(10)[::2]])  # non-contiguous: copied once
    assert blocks.coef[0].is_contiguous()
    assert "order2" in repr(blocks)


def test_kernel_sources_are_found(monkeypatch, tmp_path):
    d = _cupy.kernel_dir()
    assert all(d.joinpath(f).is_file() for f in _cupy.KERNEL_FILES)
    # an explicit folder wins
    for f in _cupy.KERNEL_FILES:
        shutil.copy(d.joinpath(f), tmp_path / f)
    monkeypatch.setenv("KAPPA_GPU_KERNEL_DIR", str(tmp_path))
    assert _cupy.kernel_dir() == tmp_path
    # nothing anywhere: the message lists every place it looked
    monkeypatch.setenv("KAPPA_GPU_KERNEL_DIR", str(tmp_path / "nowhere"))
    monkeypatch.setattr(_cupy, "KERNEL_FILES", ("kg_common.cuh", "missing.cu"))
    with pytest.raises(FileNotFoundError, match="KAPPA_GPU_KERNEL_DIR.*package data.*checkout"):
        _cupy.kernel_dir()


@pytest.mark.skipif(
    importlib.util.find_spec("setuptools") is None, reason="needs setuptools to build"
)
def test_a_built_package_carries_the_kernel_sources(tmp_path):
    """setup.py's build_py (what a wheel is made of) copies kernels/ into kappa_gpu/kernels/,
    and the installed package finds them there, without CuPy and away from the checkout."""
    repo = Path(__file__).resolve().parents[1]
    if not (repo / "setup.py").is_file():
        pytest.skip("not a source checkout")
    lib = tmp_path / "lib"
    subprocess.run(
        [sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(lib)],
        cwd=repo, check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    for f in _cupy.KERNEL_FILES:
        assert (lib / "kappa_gpu" / "kernels" / f).is_file(), f
    probe = (
        "import sys; sys.modules['cupy'] = None\n"
        "from kappa_gpu._cuda import _cupy\n"
        "print(_cupy.kernel_dir())"
    )
    env = {**os.environ, "PYTHONPATH": str(lib)}
    env.pop("KAPPA_GPU_KERNEL_DIR", None)
    found = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, env=env, check=True, capture_output=True,
        text=True, timeout=120,
    ).stdout.strip()  # fmt: skip
    assert Path(found) == lib / "kappa_gpu" / "kernels"


def test_nvrtc_options_can_be_tuned(monkeypatch):
    assert "-DKG_ILP=4" in _cupy.nvrtc_options() and "-DKG_BLOCK=256" in _cupy.nvrtc_options()
    monkeypatch.setenv("KAPPA_GPU_NVRTC_OPTIONS", "-DKG_ILP=2 -lineinfo")
    opts = _cupy.nvrtc_options()
    assert "-DKG_ILP=4" not in opts and "-DKG_ILP=2" in opts and "-lineinfo" in opts
