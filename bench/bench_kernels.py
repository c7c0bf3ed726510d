"""Fused update-block kernels vs torch eager vs the device's copy bandwidth.

Two ways to run it:

- script (what ``bench/gpu_check.sh`` runs on a GPU machine)::

      python bench/bench_kernels.py --json out/bench_kernels.json [--sizes 1e7,1e8]

  For every pass (3 families x fwd/pre/post), storage dtype (float32, bfloat16), size ``n`` and
  column count ``s``, it first checks the fused result against the torch reference (a wrong
  answer is recorded as a failure, never timed), then times with CUDA events (median of
  ``--repeat`` back-to-back launches after warm-up):

  * ``t_kernel``: the fused kernel alone (a pre-planned launch);
  * ``t_call``: the whole ``UpdateBlocks`` call (validation, planning, launch);
  * ``t_eager``: the torch reference path (the CPU fallback, run on the GPU);
  * ``t_copy``: ``y.copy_(x)`` of the same number of float32 entries, the bandwidth ceiling.

  Bytes: fused = one read of each input and coefficient vector, one write of each output
  (counted analytically); eager = what torch eager actually moves, counted per aten op with a
  ``TorchDispatchMode`` (each elementwise op reads its tensor inputs and writes its output; views
  and allocations move nothing). For Adam's full operator the eager baseline also includes the
  DESIGN.md formula written literally from ``m', v', gt``.

  Targets (reported per row, summarized in ``targets``): the fused kernel reaches >= 80% of the
  copy bandwidth for n >= 1e7, and moves >= 3x fewer bytes than torch eager for Adam full.

- pytest-benchmark::

      pytest bench/bench_kernels.py [--benchmark-disable]

  times each pass on the available device (CPU: the torch path at a small size).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

from kappa_gpu._cuda import BlockParams, UpdateBlocks, _cupy  # noqa: E402
from kappa_gpu._cuda._cases import assert_close  # noqa: E402
from kappa_gpu._cuda._reference import (  # noqa: E402
    NBLOCKS,
    check_call,
    n_inputs,
    n_outputs,
    run_reference,
)

KINDS = ("order1", "order2", "adam_full")
PASSES = ("fwd", "pre", "post")


# -- bytes ------------------------------------------------------------------------------------
class ByteCounter(TorchDispatchMode):
    """Counts the bytes torch eager moves: per aten op, tensor inputs read + outputs written.

    View and allocation ops move nothing and are skipped; an ``out=`` tensor counts as written
    only; an in-place op reads and writes its first argument.
    """

    FREE = {"empty", "empty_like", "empty_strided", "detach", "alias", "lift_fresh"}

    def __init__(self):
        super().__init__()
        self.bytes = 0
        self.ops: list[str] = []

    @staticmethod
    def _tensors(x):
        if isinstance(x, torch.Tensor):
            yield x
        elif isinstance(x, (list, tuple)):
            for y in x:
                yield from ByteCounter._tensors(y)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if getattr(func, "is_view", False) or name in self.FREE:
            return out
        read = [t for a in args for t in self._tensors(a)]
        read += [t for k, v in kwargs.items() if k != "out" for t in self._tensors(v)]
        written = list(self._tensors(out))
        self.bytes += sum(t.numel() * t.element_size() for t in read + written)
        self.ops.append(name)
        return out


def count_bytes(fn) -> tuple[int, list[str]]:
    """Bytes moved and aten ops run by ``fn()`` in torch eager."""
    with ByteCounter() as bc:
        fn()
    return bc.bytes, bc.ops


def fused_bytes(
    kind: str, direction: str, n: int, s: int, tsize: int, csize: int, ncoef: int
) -> int:
    """One read of each input, one write of each output, one read of each coefficient vector
    (shared by the s columns), plus the segment table (negligible)."""
    vecs = n_inputs(kind, direction) + n_outputs(kind, direction)
    return vecs * n * s * tsize + ncoef * n * csize


# -- problems ---------------------------------------------------------------------------------
def make_problem(kind: str, n: int, s: int, dtype: torch.dtype, device, gen, *, wd=0.05):
    """Three segments with different hyper-parameters; vectors drawn on the device."""
    sizes = [n // 2, n // 4, n - n // 2 - n // 4]
    if kind == "order1":
        params = BlockParams.order1(sizes, Da=[0.1, 0.05, 0.02], wd=wd, sign=1.0)
        coef = []
    elif kind == "order2":
        params = BlockParams.order2(
            sizes,
            a=[0.1, 0.2, 0.1],
            a2=[0.1, 0.2, 0.1],
            b=[0.9, 0.8, 0.9],
            beta=[0.9, 0.8, 0.9],
            c=[1.0, 0.999, 1.0],
            D=1.0,
            wd=wd,
            sign=1.0,
        )
        coef = [torch.rand(n, device=device, generator=gen).to(dtype) * 1e-2]
    else:
        params = BlockParams.adam_full(
            sizes,
            a=[0.1, 0.2, 0.1],
            b1=[0.9, 0.8, 0.9],
            b2=[0.999, 0.99, 0.999],
            c=[1.0, 0.999, 1.0],
            wd=wd,
            sign=1.0,
        )
        coef = [torch.rand(n, device=device, generator=gen).to(dtype) for _ in range(3)]
    shape = (n,) if s == 1 else (n, s)

    def vec():
        return torch.randn(shape, device=device, generator=gen).to(dtype)

    ins = {d: [vec() for _ in range(n_inputs(kind, d))] for d in PASSES}
    return params, coef, ins


def formula_adam_full_fwd(x1, x2, x3, hv, m1, v1, gt, hp):
    """DESIGN.md's Adam full matvec written literally from m', v', gt (one segment)."""

    def col(t):
        return t if x1.ndim == 1 else t[:, None]

    ht = hv * hp["sign"] + hp["wd"] * x1
    dm = hp["b1"] * x2 + (1 - hp["b1"]) * ht
    dv = hp["b2"] * x3 + 2 * (1 - hp["b2"]) * col(gt) * ht
    sv = v1.sqrt()
    denom = sv / hp["sqrt_bc2"] + hp["eps"]
    ddenom = torch.where(col(sv) > 0, dv / (2 * col(sv) * hp["sqrt_bc2"]), 0.0)
    D = hp["lr_bc1"] / denom
    dth = hp["c"] * x1 - col(D) * dm + hp["lr_bc1"] * col(m1) * ddenom / col(denom) ** 2
    return dth, dm, dv


# -- timing -----------------------------------------------------------------------------------
def cuda_time(fn, repeat: int = 20, warmup: int = 3, device: str = "cuda") -> float:
    """Median over 3 trials of the mean seconds per call of ``fn`` in ``repeat`` back-to-back
    calls: CUDA events on a GPU (no host sync between calls), wall clock otherwise."""
    for _ in range(warmup):
        fn()
    if device != "cuda":
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            for _ in range(repeat):
                fn()
            times.append((time.perf_counter() - t0) / repeat)
        return statistics.median(times)
    torch.cuda.synchronize()
    times = []
    for _ in range(3):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(repeat):
            fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3 / repeat)
    return statistics.median(times)


def copy_bandwidth(numel: int, repeat: int, device: str = "cuda") -> dict:
    """``y.copy_(x)`` of ``numel`` float32 entries: bytes read + written per second."""
    x = torch.empty(numel, device=device, dtype=torch.float32).normal_()
    y = torch.empty_like(x)
    t = cuda_time(lambda: y.copy_(x), repeat, device=device)
    nbytes = 2 * numel * 4
    return {"numel": numel, "bytes": nbytes, "seconds": t, "GBps": nbytes / t / 1e9}


def bench_row(kind, direction, dtype, n, s, repeat, gen, copy_cache, device="cuda") -> dict:
    """One benchmark row (see the module docstring); accuracy checked before any timing."""
    dev = torch.device(device)
    params, coef, ins_all = make_problem(kind, n, s, dtype, dev, gen)
    ins = ins_all[direction]
    row = {
        "kind": kind,
        "pass": direction,
        "dtype": str(dtype).replace("torch.", ""),
        "n": n,
        "s": s,
    }
    fused = UpdateBlocks(params, coef, backend="cupy")
    vins, vcoef, outs = check_call(params, direction, ins, fused.coef, None)
    ref_outs = [torch.empty_like(o) for o in outs]

    def call():
        nb = NBLOCKS[kind]
        if direction == "fwd":
            fused.matvec(ins[:nb], ins[nb], out=outs)
        elif direction == "pre":
            fused.rmatvec_pre(ins, out=outs[0])
        else:
            fused.rmatvec_post(ins[:nb], ins[nb], out=outs)

    def eager():
        run_reference(params, direction, vins, vcoef, ref_outs)

    # accuracy first: a wrong answer is not timed
    call()
    eager()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    try:
        for k, (g, w) in enumerate(zip(outs, ref_outs, strict=True)):
            assert_close(g, w, ins, kind, f"out{k}")
    except AssertionError as err:
        row.update(accuracy_ok=False, error=str(err)[:500])
        return row
    row["accuracy_ok"] = True

    cf = list(fused.coef)
    if direction == "post" and kind == "adam_full" and not fused._post_needs_r:
        cf[2] = None
    goff, gtab = fused._table(dev)
    plan = _cupy.plan_launch(kind, direction, vins, outs, cf, goff, gtab, _cupy.max_blocks(dev))
    ncoef = sum(c is not None for c in cf)
    csize = coef[0].element_size() if coef else 0
    row["kernel"] = plan.name
    row["grid"] = plan.grid
    row["bytes_fused"] = fused_bytes(kind, direction, n, s, ins[0].element_size(), csize, ncoef)
    row["bytes_eager"], ops = count_bytes(eager)
    row["eager_ops"] = len(ops)
    row["t_kernel"] = cuda_time(lambda: _cupy.launch(plan, dev), repeat, device=dev.type)
    row["t_call"] = cuda_time(call, repeat, device=dev.type)
    row["t_eager"] = cuda_time(eager, repeat, device=dev.type)
    numel = n * s
    if numel not in copy_cache:
        copy_cache[numel] = copy_bandwidth(numel, repeat, device=dev.type)
    row["copy_GBps"] = copy_cache[numel]["GBps"]
    row["GBps_kernel"] = row["bytes_fused"] / row["t_kernel"] / 1e9
    row["frac_copy_bw"] = row["GBps_kernel"] / row["copy_GBps"]
    row["GBps_eager"] = row["bytes_eager"] / row["t_eager"] / 1e9
    row["speedup_vs_eager"] = row["t_eager"] / row["t_kernel"]
    row["bytes_ratio_eager"] = row["bytes_eager"] / row["bytes_fused"]

    if kind == "adam_full" and direction == "fwd":
        m1 = torch.randn(n, device=dev, generator=gen).to(dtype)
        v1 = torch.rand(n, device=dev, generator=gen).to(dtype)
        gt = torch.randn(n, device=dev, generator=gen).to(dtype)
        hp = dict(sign=1.0, wd=0.05, b1=0.9, b2=0.999, sqrt_bc2=0.1, eps=1e-8, lr_bc1=1e-3, c=1.0)
        x = [t.float() if dtype == torch.bfloat16 else t for t in ins]
        extra = [t.float() if dtype == torch.bfloat16 else t for t in (m1, v1, gt)]

        def formula():
            return formula_adam_full_fwd(*x, *extra, hp)

        row["bytes_eager_formula"], fops = count_bytes(formula)
        row["eager_formula_ops"] = len(fops)
        row["t_eager_formula"] = cuda_time(formula, repeat, device=dev.type)
        row["bytes_ratio_formula"] = row["bytes_eager_formula"] / row["bytes_fused"]
    return row


def krylov_gemv(N: int, ks=(8, 32), repeat: int = 20, device: str = "cuda") -> list[dict]:
    """Bandwidth of the Krylov step's vector work as torch does it (cuBLAS GEMV): the CGS
    projection ``h = V^T w`` and the update ``w -= V h`` with ``V`` of shape ``(N, k)``.

    A fused kernel could at best save the one extra pass over ``w`` (1 of ``2k + 3`` vector
    passes of a CGS2 step); it pays only if these GEMVs run well below the copy bandwidth.
    """
    out = []
    for k in ks:
        V = torch.randn(N, k, device=device)
        w = torch.randn(N, device=device)
        h = V.T @ w
        t_proj = cuda_time(lambda: V.T.mv(w), repeat, device=device)  # noqa: B023
        t_upd = cuda_time(lambda: w.addmv_(V, h, alpha=-1e-30), repeat, device=device)  # noqa: B023
        b_proj, b_upd = (k * N + N) * 4, (k * N + 2 * N) * 4
        out.append(
            {
                "N": N,
                "k": k,
                "t_proj": t_proj,
                "GBps_proj": b_proj / t_proj / 1e9,
                "t_update": t_upd,
                "GBps_update": b_upd / t_upd / 1e9,
            }
        )
    return out


def summarize(rows: list[dict]) -> dict:
    bw = [r for r in rows if r.get("accuracy_ok") and r["n"] >= 10**7]
    bw_fail = [
        f"{r['kind']} {r['pass']} {r['dtype']} n={r['n']} s={r['s']}: {r['frac_copy_bw']:.2f}"
        for r in bw
        if r["frac_copy_bw"] < 0.8
    ]
    adam = [r for r in rows if r.get("accuracy_ok") and r["kind"] == "adam_full"]
    by_pass = {}
    for r in adam:
        by_pass.setdefault(r["pass"], []).append(round(r["bytes_ratio_eager"], 2))
    formula = [round(r["bytes_ratio_formula"], 2) for r in adam if "bytes_ratio_formula" in r]
    return {
        "fused_ge_80pct_copy_bw_for_n_ge_1e7": {
            "checked": len(bw),
            "met": len(bw) - len(bw_fail),
            "below": bw_fail,
        },
        "adam_full_bytes_ratio_vs_torch_reference_path": by_pass,
        "adam_full_fwd_bytes_ratio_vs_design_formula_eager": formula,
        "adam_full_ge_3x_fewer_bytes_than_formula_eager": bool(formula) and min(formula) >= 3.0,
        "accuracy_failures": [
            f"{r['kind']} {r['pass']} {r['dtype']} n={r['n']} s={r['s']}"
            for r in rows
            if r.get("accuracy_ok") is False
        ],
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", type=Path, required=True, help="where to write the results")
    ap.add_argument("--sizes", default="1e7,1e8", help="comma-separated n (entries per block)")
    ap.add_argument("--columns", default="1,8", help="comma-separated s; s > 1 at the first n")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--budget-s", type=float, default=240.0, help="stop adding rows after this")
    args = ap.parse_args(argv)
    t0 = time.time()
    result: dict = {"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "torch": torch.__version__}
    if not torch.cuda.is_available():
        result["skipped"] = "no CUDA device"
        args.json.write_text(json.dumps(result, indent=1))
        print("no CUDA device: nothing to benchmark")
        return 0
    st = _cupy.status()
    result["cupy"] = st.reason
    props = torch.cuda.get_device_properties(0)
    result["device"] = {
        "name": props.name,
        "sm_count": props.multi_processor_count,
        "memory_GiB": round(props.total_memory / 2**30, 1),
    }
    if not st.usable:
        result["skipped"] = f"CuPy cannot run: {st.reason}"
        args.json.write_text(json.dumps(result, indent=1))
        print(result["skipped"])
        return 1
    sizes = [int(float(x)) for x in args.sizes.split(",")]
    cols = [int(x) for x in args.columns.split(",")]
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    configs = [(n, 1) for n in sizes] + [(sizes[0], s) for s in cols if s > 1]
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows, copy_cache = [], {}
    for n, s in configs:
        for dtype in dtypes:
            for kind in KINDS:
                for direction in PASSES:
                    if time.time() - t0 > args.budget_s:
                        rows.append(
                            {
                                "kind": kind,
                                "pass": direction,
                                "n": n,
                                "s": s,
                                "dtype": str(dtype),
                                "skipped": "time budget",
                            }
                        )
                        continue
                    try:
                        row = bench_row(kind, direction, dtype, n, s, args.repeat, gen, copy_cache)
                    except Exception as err:  # record and go on: one bad row is not the run
                        row = {
                            "kind": kind,
                            "pass": direction,
                            "n": n,
                            "s": s,
                            "dtype": str(dtype),
                            "error": f"{type(err).__name__}: {err}",
                        }
                    rows.append(row)
                    print(
                        json.dumps(
                            {
                                k: (round(v, 4) if isinstance(v, float) else v)
                                for k, v in row.items()
                                if k != "error"
                            }
                        ),
                        flush=True,
                    )
                    torch.cuda.empty_cache()
    try:
        result["krylov_gemv"] = krylov_gemv(sizes[0], repeat=args.repeat)
        copy = copy_cache.get(sizes[0]) or copy_bandwidth(sizes[0], args.repeat)
        for r in result["krylov_gemv"]:
            r["frac_copy_bw_proj"] = r["GBps_proj"] / copy["GBps"]
            r["frac_copy_bw_update"] = r["GBps_update"] / copy["GBps"]
    except Exception as err:  # informative only
        result["krylov_gemv"] = f"{type(err).__name__}: {err}"
    result["copy"] = sorted(copy_cache.values(), key=lambda c: c["numel"])
    result["rows"] = rows
    result["targets"] = summarize(rows)
    result["seconds"] = round(time.time() - t0, 1)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))
    print(json.dumps(result["targets"], indent=1))
    return 0


# -- pytest-benchmark -------------------------------------------------------------------------
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["torch"] + (["cupy"] if DEVICE == "cuda" else [])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("direction", PASSES)
@pytest.mark.parametrize("kind", KINDS)
def test_bench_pass(benchmark, kind, direction, backend):
    if backend == "cupy" and not _cupy.status().usable:
        pytest.skip(f"CuPy cannot run: {_cupy.status().reason}")
    n = 10**7 if DEVICE == "cuda" else 10**5
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    params, coef, ins_all = make_problem(kind, n, 1, torch.float32, DEVICE, gen)
    ins = ins_all[direction]
    blocks = UpdateBlocks(params, coef, backend=backend)
    nb = NBLOCKS[kind]
    outs = [torch.empty_like(ins[0]) for _ in range(n_outputs(kind, direction))]

    def run():
        if direction == "fwd":
            blocks.matvec(ins[:nb], ins[nb], out=outs)
        elif direction == "pre":
            blocks.rmatvec_pre(ins, out=outs[0])
        else:
            blocks.rmatvec_post(ins[:nb], ins[nb], out=outs)
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    benchmark(run)
    assert blocks.last_backend == backend


def test_byte_counter_counts_each_op_once():
    x, y = torch.ones(1000), torch.ones(1000)
    nbytes, ops = count_bytes(lambda: torch.add(x, y).mul_(2.0))
    # add: read 2 write 1; mul_: read 1 (+ the 0-dim scalar, if wrapped) write 1
    assert nbytes >= 5 * 4000 and nbytes <= 5 * 4000 + 64, (nbytes, ops)
    assert fused_bytes("adam_full", "fwd", 10, 2, 4, 4, 3) == (4 + 3) * 10 * 2 * 4 + 3 * 10 * 4


def test_adam_full_eager_moves_several_times_the_fused_bytes():
    """The analytic ratio the GPU run reports, checked where it is cheap to check."""
    gen = torch.Generator().manual_seed(0)
    n = 4096
    params, coef, ins = make_problem("adam_full", n, 1, torch.float32, "cpu", gen)
    vins, vcoef, outs = check_call(params, "fwd", ins["fwd"], coef, None)
    ref, _ = count_bytes(lambda: run_reference(params, "fwd", vins, vcoef, outs))
    fused = fused_bytes("adam_full", "fwd", n, 1, 4, 4, 3)
    x = ins["fwd"]
    m1, v1, gt = torch.randn(n), torch.rand(n), torch.randn(n)
    hp = dict(sign=1.0, wd=0.05, b1=0.9, b2=0.999, sqrt_bc2=0.1, eps=1e-8, lr_bc1=1e-3, c=1.0)
    formula, _ = count_bytes(lambda: formula_adam_full_fwd(*x, m1, v1, gt, hp))
    assert ref / fused > 1.5  # the lean torch path (addcmul, in place) vs one fused pass
    assert formula / fused >= 3.0  # the DESIGN formula written literally
    assert math.isfinite(ref)


if __name__ == "__main__":
    raise SystemExit(main())
