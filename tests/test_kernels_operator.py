"""The backend of the update operators (``update_operator(..., backend=...)``).

On the CPU: the dispatch takes the torch path and says why in the debug log, bitwise the same
products as ``backend="torch"``; ``backend="cupy"`` off CUDA and unknown backends are clear
errors; CuPy that is installed but cannot run (no driver, or kernels that fail to compile)
costs one ``RuntimeWarning`` and changes no result; the coefficient table the fused kernels
read (run through the kernels' torch reference) gives the operator of the torch path.
On a GPU (skipped without one): the fused operator passes the finite-difference oracle of real
``optimizer.step()`` calls and agrees with the torch path to float32 rounding.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
import types
import warnings

import pytest
import torch
from _cases import ADAM_CASES, SGD_CASES, cast_case, fd_jacobian, one_thread, rel_err
from test_kernels_dispatch import fake_cupy_without_nvrtc

from kappa_gpu import update_operator
from kappa_gpu._cuda import _cupy, _dispatch
from kappa_gpu.operators import _update

ALL_CASES = {**SGD_CASES, **ADAM_CASES}
CUDA = torch.device("cuda", 0)  # a device object needs no GPU: the choice is made before use
CONFIGS = [(k, None) for k in SGD_CASES] + [(k, v) for k in ADAM_CASES for v in ("frozen", "full")]


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture
def fresh(monkeypatch):
    """Forget the process-wide CuPy probe and the warn-once flag for one test."""
    monkeypatch.setattr(_cupy, "_STATUS", None)
    monkeypatch.setattr(_dispatch, "_warned", False)



def _products(op, gen, s: int = 3) -> list[torch.Tensor]:
    """matvec, rmatvec, matmat, rmatmat of the same random vectors (float64 draws, cast)."""
    N = op.shape[0]
    x = torch.randn(N, generator=gen, dtype=torch.float64).to(op.device, op.dtype)
    X = torch.randn(N, s, generator=gen, dtype=torch.float64).to(op.device, op.dtype)
    return [op.matvec(x), op.rmatvec(x), op.matmat(X), op.rmatmat(X)]


def _see_cuda(monkeypatch):
    """Make the operator's dispatch decide as if the (CPU) tensors were on a CUDA device."""
    real = _dispatch.resolve_backend
    monkeypatch.setattr(_update, "resolve_backend", lambda b, d, dt=(): real(b, CUDA, dt))


# -- the choice on the CPU ---------------------------------------------------------------------
def test_auto_on_cpu_takes_torch_and_logs_why(caplog):
    case = SGD_CASES["heavy-tanh"]()
    with caplog.at_level(logging.DEBUG, logger="kappa_gpu"):
        op = update_operator(*case)
    assert op.backend == "torch"
    assert "on cpu" in op.backend_reason and "CUDA tensors" in op.backend_reason
    msgs = [r.getMessage() for r in caplog.records if r.name == "kappa_gpu"]
    assert any("torch path" in m and "on cpu" in m for m in msgs), msgs
    assert "backend=torch" in repr(op)
    explicit = update_operator(*case, backend="torch")
    assert explicit.backend == "torch" and "requested" in explicit.backend_reason


def test_cupy_on_cpu_is_a_clear_error_before_any_work(monkeypatch):
    case = SGD_CASES["heavy-tanh"]()

    def no_engine(*args, **kwargs):
        raise AssertionError("the backend must be checked before the gradient is computed")

    monkeypatch.setattr(_update, "_HVPEngine", no_engine)
    with pytest.raises(ValueError, match=r"backend='cupy'.*on cpu.*model\.cuda\(\).*'auto'"):
        update_operator(*case, backend="cupy")


@pytest.mark.parametrize("bad", ["gpu", "CUDA", "triton", None])
def test_unknown_backend_lists_the_choices(bad):
    case = SGD_CASES["plain-tanh"]()
    with pytest.raises(ValueError, match="backend must be one of 'auto', 'cupy', 'torch'"):
        update_operator(*case, backend=bad)


@pytest.mark.parametrize(
    "name, variant",
    [("heavy-2groups", None), ("nesterov-maximize-gelu", None), ("plain-tanh", None),
     ("adam-bn-2groups", "full"), ("adamw-2groups-maximize", "full"),
     ("adam-wd-gelu", "frozen")],
)  # fmt: skip
def test_auto_and_torch_are_bitwise_equal_on_cpu(name, variant):
    case = ALL_CASES[name]()
    auto = update_operator(*case, variant=variant)
    ref = update_operator(*case, variant=variant, backend="torch")
    assert auto.backend == ref.backend == "torch"
    for a, b in zip(
        _products(auto, torch.Generator().manual_seed(3)),
        _products(ref, torch.Generator().manual_seed(3)),
        strict=True,
    ):
        assert torch.equal(a, b)


# -- CuPy installed but unable to run ----------------------------------------------------------
def _fake_cupy(monkeypatch, *, device_count=None, error=None):
    def count():
        if error is not None:
            raise error
        return device_count

    fake = types.ModuleType("cupy")
    fake.__version__ = "0.fake"
    fake.cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=count))
    monkeypatch.setitem(sys.modules, "cupy", fake)


@pytest.mark.parametrize("name, variant", [("heavy-2groups", None), ("adam-tanh", "full")])
def test_cupy_without_a_driver_warns_once_and_gives_the_torch_results(
    fresh, monkeypatch, name, variant
):
    _fake_cupy(monkeypatch, error=RuntimeError("cudaErrorInsufficientDriver: driver too old"))
    _see_cuda(monkeypatch)
    case = ALL_CASES[name]()
    with pytest.warns(RuntimeWarning, match="CuPy is installed but cannot run") as rec:
        op = update_operator(*case, variant=variant)
        again = update_operator(*case, variant=variant)  # no second warning
    assert len(rec) == 1
    assert op.backend == again.backend == "torch" and "0.fake" in op.backend_reason
    ref = update_operator(*case, variant=variant, backend="torch")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = _products(op, torch.Generator().manual_seed(5))
    for a, b in zip(got, _products(ref, torch.Generator().manual_seed(5)), strict=True):
        assert torch.equal(a, b)


@pytest.mark.skipif(
    importlib.util.find_spec("cupy") is None or torch.cuda.is_available(),
    reason="needs CuPy installed on a machine without a usable CUDA device",
)
def test_real_cupy_without_a_gpu_warns_once(fresh, monkeypatch):
    """The real package (e.g. pip install cupy-cuda13x) on this GPU-less machine."""
    _see_cuda(monkeypatch)
    case = SGD_CASES["heavy-tanh"]()
    with pytest.warns(RuntimeWarning, match="cannot run the fused kernels") as rec:
        ops = [update_operator(*case) for _ in range(2)]
    assert len(rec) == 1 and all(op.backend == "torch" for op in ops)
    ref = update_operator(*case, backend="torch")
    x = torch.linspace(-1, 1, ref.shape[0], dtype=torch.float64)
    assert torch.equal(ops[0].matvec(x), ref.matvec(x))


def test_kernels_that_fail_to_compile_fall_back_once_to_the_torch_path(fresh, monkeypatch):
    """CuPy sees a device but NVRTC is missing: the first product warns once and is still
    right (the kernels' torch reference), then the operator is on the torch path for good."""
    _see_cuda(monkeypatch)
    calls = fake_cupy_without_nvrtc(monkeypatch)
    case = ADAM_CASES["adam-wd-gelu"]()
    op = update_operator(*case, variant="full")
    assert op.backend == "cupy" and "0.fake" in op.backend_reason
    assert "backend=cupy" in repr(op)
    ref = update_operator(*case, variant="full", backend="torch")
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(op.shape[0], generator=gen, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="compiling the fused kernels failed") as rec:
        first = op.matvec(x)
    assert len(rec) == 1 and len(calls) == 1
    assert op.backend == "torch" and "libnvrtc" in op.backend_reason
    assert rel_err(first, ref.matvec(x)) <= 1e-13
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = _products(op, torch.Generator().manual_seed(8))
    assert len(calls) == 1
    for a, b in zip(got, _products(ref, torch.Generator().manual_seed(8)), strict=True):
        assert torch.equal(a, b)


# -- the table the fused kernels read ------------------------------------------------------------
@pytest.mark.parametrize("name, variant", CONFIGS)
def test_block_table_reproduces_the_torch_path(name, variant):
    """The fused path's coefficient table and per-entry vectors, run through the kernels' torch
    reference (UpdateBlocks with backend="torch"), give the torch path's products: float64
    rounding apart (the same formulas, grouped per segment), with the same HVP count."""
    case = ALL_CASES[name]()
    ref = update_operator(*case, variant=variant, backend="torch")
    op = update_operator(*case, variant=variant, backend="torch")
    op._fuse("torch")
    assert op._blocks is not None and op._blocks.nblocks == len(op.blocks)
    n0 = op.n_hvp
    got = _products(op, torch.Generator().manual_seed(11))
    assert op.n_hvp - n0 == 1 + 1 + 3 + 3
    assert op._blocks is not None  # an explicit torch reference is kept, not a fallback
    want = _products(ref, torch.Generator().manual_seed(11))
    for a, b, what in zip(got, want, ("matvec", "rmatvec", "matmat", "rmatmat"), strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert rel_err(a, b) <= 1e-12, what


# -- on a GPU ----------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(
    "name, variant",
    [("heavy-2groups", None), ("nesterov-maximize-gelu", None), ("plain-wd-relu-2groups", None),
     ("adam-wd-gelu", "full"), ("adamw-2groups-maximize", "full"), ("adam-eps-2groups", "frozen")],
)  # fmt: skip
def test_fused_operator_on_cuda_matches_real_steps_and_the_torch_path(name, variant):
    st = _cupy.status()
    if not st.usable:
        pytest.skip(f"CuPy cannot run here: {st.reason}")
    case = ALL_CASES[name]()
    # float64 finite differences of real optimizer.step() calls, on the CPU; the frozen variant
    # is not the real step: there the two paths are compared with each other only
    J_fd = None if variant == "frozen" else fd_jacobian(*case)
    cuda32 = cast_case(case, torch.float32, "cuda")
    fused = update_operator(*cuda32, variant=variant, backend="cupy")
    torch_ = update_operator(*cuda32, variant=variant, backend="torch")
    assert fused.backend == "cupy" and torch_.backend == "torch"
    Jc = fused.to_dense()
    assert fused._blocks is not None and fused._blocks.last_backend == "cupy"
    Jt = torch_.to_dense()
    # the same formulas, regrouped: float32 rounding of terms of size ~|J|
    assert rel_err(Jc.double(), Jt.double()) <= 1e-5
    if J_fd is not None:
        # float32 operators vs float64 finite differences: the fused one is as accurate as the
        # torch one (their own float32 error, measured on the CPU: 2e-8 .. 5e-5, is Adam's q)
        err_c, err_t = rel_err(Jc.double().cpu(), J_fd), rel_err(Jt.double().cpu(), J_fd)
        assert err_t <= 1e-4
        assert err_c <= 1.5 * err_t + 1e-6, (err_c, err_t)
    gen = torch.Generator().manual_seed(13)
    for a, b, what in zip(
        _products(fused, gen), _products(torch_, torch.Generator().manual_seed(13)),
        ("matvec", "rmatvec", "matmat", "rmatmat"), strict=True,
    ):  # fmt: skip
        assert a.device.type == "cuda" and a.dtype == torch.float32
        assert rel_err(a.double(), b.double()) <= 1e-5, what
