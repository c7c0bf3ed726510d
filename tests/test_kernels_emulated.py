"""The CUDA kernels' own source, run on the CPU, against the torch reference.

``kernels/kg_common.cuh`` compiles as plain C++ too (no ``__CUDACC__``): ``kg::host_launch``
then runs every (block, thread) of a launch serially. This test builds that into a shared
library with the host C++ compiler and routes :class:`UpdateBlocks`'s CuPy path to it, so that,
without a GPU, it checks end to end: the argument marshalling (``_cupy.kernel_args``: order,
pointers, strides), the layout choice (flat / strided, rows / cols order), the grid-stride loop
with a tiny grid (every thread makes many trips), segment lookup across boundaries inside a
trip, bfloat16 rounding, and the arithmetic of every Op in ``kernels/update_blocks.cu``.

What it cannot check: NVRTC-specific compilation (see test_kernels_compile.py), the device
intrinsics (``__ldg``, ``__float_as_uint``), streams, and speed.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess

import pytest
import torch

from kappa_gpu._cuda import BlockParams, UpdateBlocks, _cupy, _dispatch
from kappa_gpu._cuda._cases import LAYOUTS, assert_close, make_case

CXX = shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")

PAIRS = [
    (torch.float32, torch.float32),
    (torch.float64, torch.float64),
    (torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.float32),
]
KINDS = ["order1", "order2", "adam_full"]

pytestmark = pytest.mark.skipif(CXX is None, reason="no host C++ compiler (g++/c++/clang++)")


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    """The kernels compiled for the host, with one entry point taking a kernel name."""
    names = [nm for t, c in PAIRS for nm in _cupy.name_expressions(t, c)]
    cases = "\n".join(
        f'  if (!std::strcmp(name, "{nm}")) {{ '
        f"{nm.replace('kg_block<', 'kg::host_launch<', 1)}(grid, args); return 0; }}"
        for nm in names
    )
    src = (
        '#include <cstring>\n#include "update_blocks.cu"\n'
        'extern "C" int kg_emulate(const char* name, long long grid, void** args) {\n'
        f"{cases}\n  return -1;\n}}\n"
    )
    d = tmp_path_factory.mktemp("kg_emulate")
    (d / "harness.cpp").write_text(src)
    lib = d / "libkg_emulate.so"
    kdir = str(_cupy.kernel_dir())
    cmd = [
        CXX,
        "-std=c++17",
        "-O1",
        "-shared",
        "-fPIC",
        "-Wno-unknown-pragmas",
        "-I",
        kdir,
        str(d / "harness.cpp"),
        "-o",
        str(lib),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    so = ctypes.CDLL(str(lib))
    so.kg_emulate.argtypes = [ctypes.c_char_p, ctypes.c_longlong, ctypes.c_void_p]
    so.kg_emulate.restype = ctypes.c_int
    return so


@pytest.fixture
def emulated(emulator, monkeypatch):
    """Route UpdateBlocks's CuPy path to the host emulation; returns the launched plans."""
    plans: list[_cupy.LaunchPlan] = []

    def launch(plan, device):
        bufs = [ctypes.create_string_buffer(a.tobytes(), a.nbytes) for a in plan.args]
        argv = (ctypes.c_void_p * len(bufs))(*[ctypes.addressof(b) for b in bufs])
        rc = emulator.kg_emulate(plan.name.encode(), plan.grid, argv)
        assert rc == 0, f"no host emulation for {plan.name}"
        plans.append(plan)

    def resolve(backend, device, dtypes=()):
        return ("torch", "requested") if backend == "torch" else ("cupy", "host emulation")

    monkeypatch.setattr(_dispatch, "resolve_backend", resolve)
    monkeypatch.setattr(_cupy, "get_kernel", lambda *a, **k: None)
    monkeypatch.setattr(_cupy, "launch", launch)
    return plans


def _run(blocks: UpdateBlocks, direction: str, ins):
    nb = blocks.nblocks
    if direction == "fwd":
        return blocks.matvec(ins[:nb], ins[nb])
    if direction == "pre":
        return (blocks.rmatvec_pre(ins),)
    return blocks.rmatvec_post(ins[:nb], ins[nb])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("pair", PAIRS, ids=lambda p: f"{p[0]}-{p[1]}".replace("torch.", ""))
def test_emulated_kernels_match_reference(kind, pair, emulated, gen):
    tdtype, cdtype = pair
    n = 1999  # odd; with grid 2 x 256 threads x 4 entries, every thread makes ~2 s trips
    for s in (None, 1, 3, 8):
        for layout in LAYOUTS:
            case = make_case(kind, n, s, tdtype, gen, coef_dtype=cdtype, layout=layout)
            fused = UpdateBlocks(case.params, case.coef, backend="cupy")
            ref = UpdateBlocks(case.params, case.coef, backend="torch")
            for direction in ("fwd", "pre", "post"):
                ins = case.ins[direction]
                got = _run(fused, direction, ins)
                want = _run(ref, direction, ins)
                assert fused.last_backend == "cupy" and ref.last_backend == "torch"
                plan = emulated[-1]
                flat = layout == "rows" or (s == 1 and layout != "slice")
                assert plan.name.endswith("true>" if flat else "false>"), (plan.name, layout, s)
                assert plan.grid == 2
                for k, (g, w) in enumerate(zip(got, want, strict=True)):
                    assert g.dtype == tdtype
                    assert_close(g, w, ins, kind, f"{kind} {direction} s={s} {layout} out{k}")


def test_emulated_order_follows_the_layout(emulated, gen):
    case = make_case("order2", 301, 4, torch.float32, gen, layout="cols")
    UpdateBlocks(case.params, case.coef, backend="cupy").matvec(
        case.ins["fwd"][:2], case.ins["fwd"][2]
    )
    assert int(emulated[-1].args[2]) == 1  # (s, n) memory: columns outer
    case = make_case("order2", 301, 4, torch.float32, gen, layout="slice")
    UpdateBlocks(case.params, case.coef, backend="cupy").matvec(
        case.ins["fwd"][:2], case.ins["fwd"][2]
    )
    assert int(emulated[-1].args[2]) == 0


def test_emulated_bf16_rounding_is_torchs(emulated):
    """u = Da * y1 is one float32 product: the kernel's round-to-nearest-even must give torch's
    bfloat16 bit for bit, infinities, ties and subnormals included (NaN: a NaN; torch's own
    NaN bits differ between its scalar and vectorized conversions)."""
    y = torch.tensor(
        [
            0.0,
            -0.0,
            1.0,
            -1.5,
            3.0e38,
            -3.0e38,
            float("inf"),
            float("-inf"),
            float("nan"),
            1e-39,
            -2e-40,
            1.00390625,
            1.01171875,
            65504.0,
        ],
        dtype=torch.float32,
    )
    y = torch.cat([y, torch.randn(4000, generator=torch.Generator().manual_seed(3)) * 100])
    y16 = y.to(torch.bfloat16)
    for Da in (0.7, 1.0, 3.3, 1 + 2**-9):
        params = BlockParams.order1([y.numel()], Da=Da)
        u = UpdateBlocks(params, backend="cupy").rmatvec_pre([y16])
        want = (y16.float() * Da).to(torch.bfloat16)
        nan = want.isnan()
        assert torch.equal(u.isnan(), nan), Da
        assert torch.equal(u[~nan].view(torch.int16), want[~nan].view(torch.int16)), Da


def test_emulated_adam_full_post_skips_r_when_no_weight_decay(emulated, gen):
    case = make_case("adam_full", 97, 2, torch.float32, gen, wd_zero=True)
    blocks = UpdateBlocks(case.params, case.coef, backend="cupy")
    ins = case.ins["post"]
    got = blocks.rmatvec_post(ins[:3], ins[3])
    assert int(emulated[-1].args[26]) == 0  # cf2 (r) not passed
    want = UpdateBlocks(case.params, case.coef, backend="torch").rmatvec_post(ins[:3], ins[3])
    for g, w in zip(got, want, strict=True):
        assert_close(g, w, ins, "adam_full", "post without r")
    # with weight decay, r is read
    case = make_case("adam_full", 97, 2, torch.float32, gen)
    UpdateBlocks(case.params, case.coef, backend="cupy").rmatvec_post(
        case.ins["post"][:3], case.ins["post"][3]
    )
    assert int(emulated[-1].args[26]) != 0


def test_emulated_empty_and_single_entry(emulated, gen):
    for n in (0, 1):
        case = make_case("order2", n, 3, torch.float32, gen, sizes=[n])
        fused = UpdateBlocks(case.params, case.coef, backend="cupy")
        ref = UpdateBlocks(case.params, case.coef, backend="torch")
        ins = case.ins["post"]
        for g, w in zip(
            fused.rmatvec_post(ins[:2], ins[2]), ref.rmatvec_post(ins[:2], ins[2]), strict=True
        ):
            assert g.shape == (n, 3)
            assert_close(g, w, ins, "order2", f"n={n}")


def test_emulated_writes_into_out_views(emulated, gen):
    """The operator passes views of one (N, s) result as out=: only those entries change."""
    case = make_case("adam_full", 50, 3, torch.float32, gen)
    ins = case.ins["fwd"]
    Y = torch.full((3 * 50 + 7, 3), 7.0)
    out = [Y[k * 50 : (k + 1) * 50] for k in range(3)]
    got = UpdateBlocks(case.params, case.coef, backend="cupy").matvec(ins[:3], ins[3], out=out)
    assert all(g is o for g, o in zip(got, out, strict=True))
    assert torch.all(Y[150:] == 7.0)
    want = UpdateBlocks(case.params, case.coef, backend="torch").matvec(ins[:3], ins[3])
    for g, w in zip(got, want, strict=True):
        assert_close(g, w, ins, "adam_full", "out views")
