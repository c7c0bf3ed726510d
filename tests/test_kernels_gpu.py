"""The fused CuPy kernels on a real GPU against the torch reference (skipped without CUDA).

Every pass of every family, for float32, float64, bfloat16 (with bfloat16 or float32
coefficients) and float32 with float64 coefficients; odd sizes, several segments (one empty,
one of a single entry), 1-D vectors and s = 1..8 columns in three memory layouts; a size that
makes the grid-stride loop turn; the current torch stream; the dispatch on CUDA tensors.
Run on a GPU machine by ``bench/gpu_check.sh``.
"""

from __future__ import annotations

import logging
import zlib

import pytest
import torch

from kappa_gpu._cuda import UpdateBlocks, _cupy
from kappa_gpu._cuda._cases import LAYOUTS, assert_close, make_case

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

KINDS = ["order1", "order2", "adam_full"]
PASSES = ["fwd", "pre", "post"]
PAIRS = [
    (torch.float32, torch.float32),
    (torch.float64, torch.float64),
    (torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.float32),
    (torch.float32, torch.float64),
]


@pytest.fixture(scope="module")
def cupy_ok():
    st = _cupy.status()
    if not st.usable:
        pytest.skip(f"CuPy cannot run here: {st.reason}")
    return st


def _run(blocks: UpdateBlocks, direction: str, ins, out=None):
    nb = blocks.nblocks
    if direction == "fwd":
        return blocks.matvec(ins[:nb], ins[nb], out=out)
    if direction == "pre":
        return (blocks.rmatvec_pre(ins, out=None if out is None else out[0]),)
    return blocks.rmatvec_post(ins[:nb], ins[nb], out=out)


def _compare(case, kind, direction, what):
    fused = UpdateBlocks(case.params, case.coef, backend="cupy")
    ref = UpdateBlocks(case.params, case.coef, backend="torch")
    ins = case.ins[direction]
    got = _run(fused, direction, ins)
    want = _run(ref, direction, ins)
    assert fused.last_backend == "cupy"
    torch.cuda.synchronize()
    for k, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g.dtype == ins[0].dtype and g.is_cuda
        assert_close(g, w, ins, kind, f"{what} out{k}")


@pytest.mark.parametrize("direction", PASSES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("pair", PAIRS, ids=lambda p: f"{p[0]}-{p[1]}".replace("torch.", ""))
def test_fused_equals_reference(kind, direction, pair, cupy_ok):
    tdtype, cdtype = pair
    gen = torch.Generator().manual_seed(zlib.crc32(f"{kind}{direction}{pair}".encode()))
    for n in (1, 4099):
        for s in (None, *range(1, 9)):
            for layout in LAYOUTS:
                case = make_case(
                    kind, n, s, tdtype, gen, coef_dtype=cdtype, layout=layout, device="cuda"
                )
                _compare(case, kind, direction, f"{kind} {direction} n={n} s={s} {layout}")


@pytest.mark.parametrize(
    "kind, direction, dtype",
    [
        ("order2", "fwd", torch.float32),
        ("adam_full", "post", torch.bfloat16),
        ("order1", "pre", torch.float64),
    ],
)
def test_fused_large_sizes_turn_the_grid_stride_loop(kind, direction, dtype, cupy_ok):
    gen = torch.Generator().manual_seed(5)
    n = 3_000_017  # > 8 blocks/SM x SMs x 1024 entries on any current GPU
    case = make_case(
        kind, n, None, dtype, gen, device="cuda", sizes=[1, 1_000_000, 0, 999_999, 1_000_017]
    )
    _compare(case, kind, direction, f"{kind} {direction} n={n}")
    case = make_case(kind, n // 4, 4, dtype, gen, device="cuda", layout="cols")
    _compare(case, kind, direction, f"{kind} {direction} n={n // 4} s=4 cols")


def test_order2_without_d_vector_and_adam_post_without_weight_decay(cupy_ok):
    gen = torch.Generator().manual_seed(6)
    case = make_case("order2", 777, 3, torch.float32, gen, d_vector=False, device="cuda")
    for direction in PASSES:
        _compare(case, "order2", direction, f"order2 no-D {direction}")
    case = make_case("adam_full", 777, 3, torch.float32, gen, wd_zero=True, device="cuda")
    _compare(case, "adam_full", "post", "adam_full post without r")


def test_fused_runs_on_the_current_torch_stream(cupy_ok):
    """Inputs finished late on a side stream: a kernel on any other stream would read them
    too early; on the current one it waits in stream order, with no host sync."""
    gen = torch.Generator().manual_seed(7)
    case = make_case("adam_full", 1_000_003, None, torch.float32, gen, device="cuda")
    ins = case.ins["fwd"]
    want = UpdateBlocks(case.params, case.coef, backend="torch").matvec(ins[:3], ins[3])
    blocks = UpdateBlocks(case.params, case.coef, backend="cupy")
    late = [torch.zeros_like(t) for t in ins]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(100_000_000)  # ~50 ms of GPU time before the inputs are written
        for dst, src in zip(late, ins, strict=True):
            dst.copy_(src)
        got = blocks.matvec(late[:3], late[3])
    side.synchronize()
    for g, w in zip(got, want, strict=True):
        assert_close(g, w, ins, "adam_full", "side stream")


def test_auto_picks_cupy_on_cuda_and_logs_it(cupy_ok, caplog):
    gen = torch.Generator().manual_seed(8)
    case = make_case("order2", 1001, 2, torch.float32, gen, device="cuda")
    blocks = UpdateBlocks(case.params, case.coef)  # backend="auto"
    with caplog.at_level(logging.DEBUG, logger="kappa_gpu"):
        blocks.matvec(case.ins["fwd"][:2], case.ins["fwd"][2])
    assert blocks.last_backend == "cupy"
    assert any("fused CuPy kernels" in r.getMessage() for r in caplog.records)
    # float16 has no kernel: auto takes the torch path and says why
    case16 = make_case("order2", 1001, 2, torch.float16, gen, device="cuda")
    b16 = UpdateBlocks(case16.params, case16.coef)
    b16.matvec(case16.ins["fwd"][:2], case16.ins["fwd"][2])
    assert b16.last_backend == "torch" and "float16" in b16.last_reason


def test_out_views_and_bare_cuda_device(cupy_ok):
    gen = torch.Generator().manual_seed(9)
    case = make_case("adam_full", 513, 5, torch.float32, gen, device="cuda")
    ins = case.ins["fwd"]
    Y = torch.full((3 * 513 + 3, 5), 7.0, device="cuda")
    out = [Y[k * 513 : (k + 1) * 513] for k in range(3)]
    got = UpdateBlocks(case.params, case.coef, backend="cupy").matvec(ins[:3], ins[3], out=out)
    assert all(g is o for g, o in zip(got, out, strict=True))
    assert torch.all(Y[3 * 513 :] == 7.0)
    want = UpdateBlocks(case.params, case.coef, backend="torch").matvec(ins[:3], ins[3])
    for g, w in zip(got, want, strict=True):
        assert_close(g, w, ins, "adam_full", "out views")
    # the reference gives the same on CPU and GPU (the fallback is one code path)
    cpu = UpdateBlocks(case.params, [c.cpu() for c in case.coef], backend="torch").matvec(
        [t.cpu() for t in ins[:3]], ins[3].cpu()
    )
    for g, w in zip(cpu, want, strict=True):
        assert_close(g, w.cpu(), [t.cpu() for t in ins], "adam_full", "cpu vs cuda reference")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_fused_on_a_second_device(cupy_ok):
    gen = torch.Generator().manual_seed(10)
    case = make_case("order2", 2049, 3, torch.float32, gen, device="cuda:1")
    _compare(case, "order2", "post", "cuda:1")
