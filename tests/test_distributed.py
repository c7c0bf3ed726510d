"""Estimates under torch.distributed: DDP on gloo/CPU with 2 processes, agreement, FSDP2 error.

One ``torch.multiprocessing.spawn`` of 2 ranks runs every distributed check (a spawn costs a few
seconds); each rank writes what it saw to a file and the test process compares it with a
single-process estimate on the whole batch, at the exact point (model and optimizer state) the
ranks reached by DDP training.
"""

from __future__ import annotations

import copy
import os
import traceback
from datetime import timedelta

import numpy as np
import pytest
import torch

import kappa_gpu as kg
from kappa_gpu.operators import UnsupportedConfigurationError

dist = torch.distributed

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available in this torch build",
)

WORLD = 2
B = 16  # rows per rank; the whole batch has WORLD * B rows
RTOL = 1e-6  # the bar, float64


# -- the problems (shared by the ranks and the single-process reference) --------------------
def mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    # mean reduction: with equal halves, the mean of the per-rank means is the global mean
    return ((out - target) ** 2).mean()


def whole_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    X = torch.randn(WORLD * B, 4, generator=g, dtype=torch.float64)
    return X, torch.sin(X.sum(1, keepdim=True))


def local_batch(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    X, y = whole_batch()
    return X[rank * B : (rank + 1) * B], y[rank * B : (rank + 1) * B]


def make_model() -> torch.nn.Module:
    g = torch.Generator().manual_seed(3)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)
    ).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.7 * torch.randn(p.shape, generator=g, dtype=torch.float64))
    return model


def make_optimizer(kind: str, params) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.05, momentum=0.9)
    return torch.optim.Adam(params, lr=0.01)


#: case -> (optimizer kind, estimate kwargs)
CASES = {
    "sgd": ("sgd", dict(k=3, modes="both", tol=1e-10)),  # structured (Lanczos + 2x2 blocks)
    "adam_full": ("adam", dict(k=2, variant="full", tol=1e-10)),  # Krylov-Schur on 3n dims
}


def _snapshot(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict:
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "buffers": [b.clone() for b in model.buffers()],
        "opt": copy.deepcopy(opt.state_dict()),
        "rng": torch.get_rng_state(),
        "training": [m.training for m in model.modules()],
    }


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def _summary(rep) -> dict:
    return {
        "eigenvalues": np.asarray(rep.eigenvalues),
        "kappa_V": float(rep.kappa_V),
        "converged": np.asarray(rep.converged),
        "n_hvp": int(rep.n_hvp),
        "method": rep.method,
    }


def _error_name(fn) -> str:
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - the test records which error each rank saw
        return f"{type(exc).__name__}: {exc}"
    return "no error"


# -- the ranks -------------------------------------------------------------------------------
def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=WORLD,
        timeout=timedelta(seconds=60),
    )
    out: dict = {"failures": []}
    try:
        _checks(rank, out)
        _monitor_checks(rank, out, os.path.join(out_dir, "monitor"))
    except Exception:  # noqa: BLE001 - report it to the test process rather than hang
        out["failures"].append(traceback.format_exc())
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    # Tear down together: one full-suite run of .ci/run (1 of about 30 runs of this module) saw
    # rank 1 abort in gloo's teardown ("terminate called without an active exception") after
    # all its checks had passed, while rank 0 was still finishing; a barrier first is the usual
    # shutdown of a gloo job.
    dist.barrier()
    dist.destroy_process_group()


def _checks(rank: int, out: dict) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    fail = out["failures"].append
    batch = local_batch(rank)

    # 1. DDP: train a few steps (each rank on its half), then estimate on every rank.
    for name, (okind, kwargs) in CASES.items():
        ddp = DDP(make_model())
        opt = make_optimizer(okind, ddp.parameters())
        for _ in range(3):
            opt.zero_grad()
            mse(ddp(batch[0]), batch[1]).backward()
            opt.step()
        before = _snapshot(ddp.module, opt)
        rep = kg.estimate(ddp, opt, mse, batch, **kwargs)
        after = _snapshot(ddp.module, opt)
        for key in before:
            if not _same(before[key], after[key]):
                fail(f"{name}: estimate changed {key} on rank {rank}")
        out[name] = _summary(rep)
        out[name + "_state"] = (
            copy.deepcopy(ddp.module.state_dict()),
            copy.deepcopy(opt.state_dict()),
        )
        if name == "sgd":
            _more_checks(rank, ddp, opt, batch, kwargs, rep.n_params, out)
            if not _same(before, _snapshot(ddp.module, opt)):
                fail(f"the failed/extra estimates changed the model or optimizer on rank {rank}")

    # 2. FSDP2 (fully_shard on a CPU mesh): the clear error.
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
    except ImportError as exc:
        out["err_fsdp2"] = f"skip: {exc}"
    else:
        mesh = init_device_mesh("cpu", (WORLD,))
        sharded = fully_shard(make_model(), mesh=mesh)
        opt = make_optimizer("sgd", sharded.parameters())
        out["err_fsdp2"] = _error_name(lambda: kg.estimate(sharded, opt, mse, batch, k=2))
        out["err_fsdp2_hessian"] = _error_name(lambda: kg.hessian_operator(sharded, mse, batch))

    # 3. SyncBatchNorm in train mode: the clear error (its forward runs collectives).
    sbn = torch.nn.Sequential(
        torch.nn.Linear(4, 6), torch.nn.SyncBatchNorm(6), torch.nn.Linear(6, 1)
    ).double()
    opt = torch.optim.SGD(sbn.parameters(), lr=0.1)
    # (DDP refuses SyncBatchNorm on CPU modules; the check needs only a process group of 2)
    out["err_syncbn"] = _error_name(lambda: kg.update_operator(sbn, opt, mse, batch))


def _more_checks(rank, ddp, opt, batch, kwargs, n, out) -> None:
    """Process groups, generators, and errors raised on every rank together (SGD case)."""
    # the same operator built on the plain module with an explicit group
    rep = kg.estimate(ddp.module, opt, mse, batch, process_group=dist.group.WORLD, **kwargs)
    out["sgd_explicit_group"] = _summary(rep)
    # ranks handed differently seeded generators still agree (rank 0's state is broadcast)
    gen = torch.Generator().manual_seed(100 + rank)
    small = dict(kwargs, k=2, modes="sharp")
    out["sgd_own_generator"] = _summary(kg.estimate(ddp, opt, mse, batch, generator=gen, **small))
    op = kg.update_operator(ddp, opt, mse, batch)
    out["world_size"] = op.world_size
    out["loss"] = op.loss

    # every rank raises together: a NaN in rank 1's batch, a bad batch on rank 1 only,
    # warm-start vectors that differ between ranks
    nan_batch = (batch[0].clone(), batch[1].clone())
    if rank == 1:
        nan_batch[0][0, 0] = float("nan")
    out["err_nan"] = _error_name(lambda: kg.estimate(ddp, opt, mse, nan_batch, k=2))
    bad_batch = batch if rank == 0 else (batch[0][:, :3], batch[1])
    out["err_batch"] = _error_name(lambda: kg.estimate(ddp, opt, mse, bad_batch, k=2))
    gen = torch.Generator().manual_seed(rank)
    warm = torch.randn(n, 2, generator=gen, dtype=torch.float64)
    out["err_warm"] = _error_name(lambda: kg.estimate(ddp, opt, mse, batch, k=2, warm_start=warm))
    # different arguments, or an argument error on one rank: one fixed-size agreement first
    # (review cases: a hang until the group's timeout, a gloo abort, or a wrong diagnosis)
    modes = "sharp" if rank == 0 else "both"
    out["err_modes"] = _error_name(lambda: kg.estimate(ddp, opt, mse, batch, k=2, modes=modes))
    dt = None if rank == 0 else torch.float32
    out["err_dtype"] = _error_name(lambda: kg.estimate(ddp, opt, mse, batch, k=2, dtype=dt))
    out["err_k"] = _error_name(lambda: kg.estimate(ddp, opt, mse, batch, k=2 if rank else 0))
    params = list(ddp.module.parameters())[: None if rank == 0 else 2]
    out["err_params"] = _error_name(lambda: kg.hessian_operator(ddp, mse, batch, params=params))

    # a subgroup of one rank: no communication, that rank's batch alone
    sub = dist.new_group([0])
    if rank == 0:
        rep = kg.estimate(ddp, opt, mse, batch, process_group=sub, **small)
        out["sub"] = _summary(rep)
        out["local"] = _summary(kg.estimate(ddp.module, opt, mse, batch, **small))
    else:
        out["err_sub"] = _error_name(
            lambda: kg.estimate(ddp, opt, mse, batch, process_group=sub, k=2)
        )


def _monitor_checks(rank: int, out: dict, log_dir: str) -> None:
    """KappaMonitor on a DDP model: every rank estimates, rank 0 alone writes the log."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from kappa_gpu._monitor import KappaMonitor

    batch = local_batch(rank)
    ddp = DDP(make_model())
    opt = make_optimizer("sgd", ddp.parameters())
    # budget_s: each rank derives a maxiter from its own timings; the monitor uses rank 0's
    mon = KappaMonitor(ddp, opt, mse, every=2, k=2, log_dir=log_dir, tensorboard=False,
                          budget_s=60.0, tol=1e-10)  # fmt: skip
    records = []
    for _ in range(4):
        opt.zero_grad()
        mse(ddp(batch[0]), batch[1]).backward()
        opt.step()
        rec = mon.step(batch)
        if rec is not None:
            records.append(rec)

    def no_batch_on_rank_1():
        if rank == 1:
            raise RuntimeError("no batch on rank 1")
        return batch

    # a failure while preparing the estimate on one rank: every rank records it, none hangs
    records.append(mon.step(no_batch_on_rank_1, force=True))
    mon.close()
    try:  # an overhead cap would let the ranks' own clocks decide who enters a collective
        KappaMonitor(ddp, opt, mse, max_overhead=0.1)
        cap_error = ""
    except ValueError as err:
        cap_error = str(err)
    out["monitor"] = {
        "cap_error": cap_error,
        "active": mon.active,
        "writes": mon.writes,
        "status": [r.status for r in records],
        "error": records[-1].error,
        "kappa_V": [r.kappa_V for r in records[:-1]],
        "loss": [r.loss for r in records[:-1]],
        "maxiter": [r.maxiter for r in records[:-1]],
        "log_dir": log_dir,
    }


# -- the test --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("dist")
    torch.multiprocessing.spawn(
        _worker, args=(str(tmp / "init"), str(tmp)), nprocs=WORLD, join=True
    )
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _reference(name: str, state) -> dict:
    """One process, the whole batch, at the point the DDP ranks reached."""
    okind, kwargs = CASES[name]
    model = make_model()
    model.load_state_dict(state[0])
    opt = make_optimizer(okind, model.parameters())
    opt.load_state_dict(state[1])
    return _summary(kg.estimate(model, opt, mse, whole_batch(), **kwargs))


def _assert_close(got: dict, ref: dict, rtol: float = RTOL) -> None:
    z, zr = got["eigenvalues"], ref["eigenvalues"]
    assert z.shape == zr.shape
    for w in zr:  # match each reference eigenvalue to the nearest computed one
        assert np.min(np.abs(z - w)) <= rtol * max(abs(w), 1.0), (w, z)
    assert abs(got["kappa_V"] - ref["kappa_V"]) <= rtol * ref["kappa_V"]
    assert got["converged"].all() and ref["converged"].all()


def test_ranks_ran_cleanly(ranks):
    for r, out in enumerate(ranks):
        assert not out["failures"], f"rank {r}:\n" + "\n".join(out["failures"])


@pytest.mark.parametrize("name", list(CASES))
def test_ddp_matches_one_process_on_the_whole_batch(ranks, name):
    # DDP training keeps the point and the optimizer state identical on every rank
    for out in ranks[1:]:
        assert _same(out[name + "_state"], ranks[0][name + "_state"])
    ref = _reference(name, ranks[0][name + "_state"])
    for out in ranks:
        _assert_close(out[name], ref)
        assert out[name]["method"] == ref["method"]
    # and every rank computed the same Ritz pairs, bitwise, with the same cost
    for out in ranks[1:]:
        assert np.array_equal(out[name]["eigenvalues"], ranks[0][name]["eigenvalues"])
        assert out[name]["kappa_V"] == ranks[0][name]["kappa_V"]
        assert out[name]["n_hvp"] == ranks[0][name]["n_hvp"]


def test_ddp_loss_is_the_global_mean(ranks):
    state = ranks[0]["sgd_state"]
    model = make_model()
    model.load_state_dict(state[0])
    X, y = whole_batch()
    with torch.no_grad():
        whole = float(mse(model(X), y))
    for out in ranks:
        assert out["world_size"] == WORLD
        assert abs(out["loss"] - whole) <= 1e-12 * whole


def test_explicit_group_and_generator(ranks):
    for out in ranks:
        # the plain module with process_group=WORLD is the same computation as DDP
        assert np.array_equal(out["sgd_explicit_group"]["eigenvalues"], out["sgd"]["eigenvalues"])
    # differently seeded generators: still the same Ritz pairs on every rank, and the same
    # sharpest modes as the default start (the top-2 of the k=3 "sharp" side)
    own = [out["sgd_own_generator"]["eigenvalues"] for out in ranks]
    assert np.array_equal(own[0], own[1])
    for w in own[0]:
        assert np.min(np.abs(ranks[0]["sgd"]["eigenvalues"] - w)) <= RTOL * max(abs(w), 1.0)


def test_subgroup_of_one_rank(ranks):
    # rank 0 alone on its half: the same as a local estimate on the plain module
    assert np.array_equal(ranks[0]["sub"]["eigenvalues"], ranks[0]["local"]["eigenvalues"])
    assert "ValueError" in ranks[1]["err_sub"] and "not a member" in ranks[1]["err_sub"]


@pytest.mark.parametrize(
    "key, error, words",
    [
        ("err_nan", "NonFiniteError", ["not finite on ranks [1]"]),
        ("err_batch", "BatchError", ["cannot take the batch"]),
        ("err_warm", "DistributedError", ["differ between ranks"]),
        ("err_modes", "DistributedError", ["with different modes"]),
        ("err_dtype", "DistributedError", ["with different dtype"]),
        ("err_params", "DistributedError", ["hessian_operator with different numels"]),
    ],
)
def test_every_rank_raises_together(ranks, key, error, words):
    for r, out in enumerate(ranks):
        msg = out[key]
        assert msg.startswith(error), f"rank {r}: {msg}"
        for w in words:
            assert w in msg, f"rank {r}: {msg}"
    # the rank that did not fail names the one that did
    if key == "err_batch":
        assert "rank 1 failed" in ranks[0][key]


def test_an_argument_error_on_one_rank_raises_on_every_rank(ranks):
    assert ranks[0]["err_k"].startswith("ValueError: k must be a positive integer")
    assert "rank 0 failed checking the arguments of estimate" in ranks[1]["err_k"]


def test_fsdp2_raises_a_clear_error(ranks):
    for out in ranks:
        for key in ("err_fsdp2", "err_fsdp2_hessian"):
            msg = out[key]
            if msg.startswith("skip:"):
                pytest.skip(f"FSDP2 not importable in this build ({msg})")
            assert msg.startswith(UnsupportedConfigurationError.__name__), msg
            assert "FSDP2" in msg and "DistributedDataParallel" in msg, msg
            assert "unsharded copy" in msg, msg


def test_syncbatchnorm_raises_a_clear_error(ranks):
    for out in ranks:
        assert out["err_syncbn"].startswith("UnsupportedConfigurationError"), out["err_syncbn"]
        assert "SyncBatchNorm" in out["err_syncbn"]


def test_monitor_with_ddp_writes_one_log(ranks):
    mons = [out["monitor"] for out in ranks]
    assert [m["active"] for m in mons] == [True] * WORLD  # every rank takes part
    assert [m["writes"] for m in mons] == [True] + [False] * (WORLD - 1)
    for m in mons:
        assert m["status"] == ["ok", "ok", "error"], m
    # every rank got the same records: same numbers, mean loss, rank 0's budget maxiter
    for key in ("kappa_V", "loss", "maxiter"):
        assert mons[1][key] == mons[0][key], key
    assert "rank 1 failed while preparing an estimate" in mons[0]["error"]
    assert "no batch on rank 1" in mons[1]["error"]
    assert all("max_overhead is not available" in m["cap_error"] for m in mons)
    # one log file, written by rank 0 alone: one line per record, not one per rank
    log_dir = mons[0]["log_dir"]
    assert all(m["log_dir"] == log_dir for m in mons)  # the same directory on every rank
    assert sorted(os.listdir(log_dir)) == ["kappa_monitor.jsonl"]
    with open(os.path.join(log_dir, "kappa_monitor.jsonl")) as f:
        lines = f.read().splitlines()
    assert len(lines) == 3


def test_sharded_detection_without_distributed():
    # the check is a walk over modules and parameters: a plain model is not sharded
    from kappa_gpu._distributed import resolve_model, sharding_of

    model = make_model()
    assert sharding_of(model) is None
    assert resolve_model(model) == (model, None)
    with pytest.raises(ValueError, match="not initialized"):
        resolve_model(model, process_group=object())
