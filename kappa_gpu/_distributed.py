"""Estimates under ``torch.distributed``: DDP-wrapped models, process groups, agreement.

What is supported, and how (the operators in :mod:`kappa_gpu.operators` and
:func:`kappa_gpu.estimate` call into this module; users only pass ``process_group``):

* **DistributedDataParallel.** A DDP-wrapped model is unwrapped to ``model.module``; every
  loss evaluation is ``torch.func.functional_call`` on that plain module (DDP's autograd hooks do
  not fire under ``torch.autograd.grad``, and ``torch.func`` transforms do not go through the
  wrapper, so DDP itself is never called). Each rank computes the gradient and the
  Hessian-vector products of *its own* loss on *its own* batch, and the results are averaged
  over the process group with one ``all_reduce`` per product (one for the gradient at build
  time). This is the map DDP's training step applies: DDP averages the per-rank gradients too.
  With a mean-reduced loss and equal local batch sizes it is exactly the Hessian of the
  global-batch mean loss.
* **Replicated Krylov work.** Every vector the solvers see is the full, replicated state vector:
  the all-reduced products are bitwise identical on every rank, the start vectors come from a
  generator whose state is broadcast from the group's first rank (:func:`broadcast_generator`),
  and the small dense work is deterministic, so every rank runs the same iterations and computes
  the same Ritz pairs. (This needs ranks with the same hardware and library versions: cuBLAS,
  for instance, is bitwise reproducible only on GPUs of the same architecture and SM count.)
* **Agreement before every collective.** Each product first exchanges a tiny status row per
  rank (``all_gather``): whether the rank failed (non-finite values, a bad batch, a stale
  operator, out of memory...) and a checksum of the input vector. If any rank failed, *every*
  rank raises (the failing one its own exception, the others the same
  :class:`~kappa_gpu.operators.OperatorError` subclass naming the failing rank, or
  :class:`~kappa_gpu.operators._validate.DistributedError`), so no rank is left waiting in an
  all-reduce; if the inputs differ between ranks (different warm-start vectors, parameters or
  optimizer states), every rank raises :class:`DistributedError` instead of computing garbage.
  Cost: one all-gather of a few numbers and one pass over the vector per product.
* **Process group.** ``process_group=None`` (default): the DDP wrapper's own process group (the
  world group unless DDP was built with another) when the model is DDP-wrapped and
  ``torch.distributed`` is initialized; otherwise no communication. An explicit group averages
  over that group's ranks (the model may then be wrapped or plain); only its members may call.
  To estimate on one rank's batch alone, pass the plain ``model.module`` (and call on that rank
  only).

Not supported (a clear :class:`UnsupportedConfigurationError` at build time):

* **FSDP2** (``torch.distributed.fsdp.fully_shard``), FSDP1 (``FullyShardedDataParallel``) and
  other DTensor-sharded parameters (tensor parallelism): the Krylov vectors would have to be
  sharded like the parameters, with all-reduced inner products; not implemented yet. Estimate on
  an unsharded copy (gather a full state dict, load it into a plain copy of the model and of the
  optimizer, then estimate there, on one rank or DDP-wrapped on a subgroup).
* **SyncBatchNorm in train mode** while a process group of size > 1 exists: its forward runs
  collectives of its own, with per-rank statistics gathered across ranks, inside the HVPs.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from kappa_gpu.operators._validate import OperatorError, UnsupportedConfigurationError

# The error classes live in kappa_gpu.operators._validate and are imported where raised: the
# operators import this module, and importing the operators package from here at import time
# would be circular (kappa_gpu._estimate imports this module before kappa_gpu.operators).

__all__ = [
    "Communicator",
    "resolve_model",
    "sharding_of",
    "broadcast_generator",
    "check_not_sharded",
    "checksum",
    "communicator_of",
    "model_communicator",
    "agree_before_estimate",
]

#: The error classes another rank may re-raise by name (all take one message argument).
_REPLAYABLE: dict[str, type[OperatorError]] = {}


def _replayable() -> dict[str, type[OperatorError]]:
    if not _REPLAYABLE:
        from kappa_gpu.operators import _validate

        for name in _validate.__all__:
            cls = getattr(_validate, name)
            if isinstance(cls, type) and issubclass(cls, _validate.OperatorError):
                _REPLAYABLE[name] = cls
    return _REPLAYABLE


def _dist_ready() -> bool:
    dist = torch.distributed
    return bool(dist.is_available() and dist.is_initialized())


class Communicator:
    """The process group an operator's gradient and products are averaged over.

    Every method is a collective: all ranks of the group must call it, in the same order.

    Attributes:
        group: the ``ProcessGroup``.
        rank: this process's rank in the group.
        world_size: number of ranks in the group (always > 1: a group of one needs no
            communication and gets no communicator).
        device: where the small status tensors live (the parameters' device: NCCL needs CUDA).
    """

    def __init__(self, group: Any, device: torch.device):
        dist = torch.distributed
        self.group = group
        self.rank = int(dist.get_rank(group))
        self.world_size = int(dist.get_world_size(group))
        self.device = torch.device(device)
        self._global_ranks = [int(dist.get_global_rank(group, r)) for r in range(self.world_size)]

    def __repr__(self) -> str:
        return f"<Communicator rank {self.rank} of {self.world_size}>"

    @property
    def src(self) -> int:
        """The global rank of the group's first rank (the broadcast source)."""
        return self._global_ranks[0]

    def global_rank(self, group_rank: int) -> int:
        """The global rank of a rank of the group."""
        return self._global_ranks[group_rank]

    # -- collectives ------------------------------------------------------------------------
    def average_(self, t: torch.Tensor) -> torch.Tensor:
        """All-reduce ``t`` to the mean over the group, in place (sum, then divide).

        SUM then divide rather than ``ReduceOp.AVG``: gloo has no AVG. Costs one all-reduce of
        ``t``; the result is the same on every rank.
        """
        if not t.is_contiguous():
            raise ValueError("average_ needs a contiguous tensor")  # pragma: no cover
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM, group=self.group)
        return t.div_(self.world_size)

    def exchange(
        self,
        error: BaseException | None,
        where: str,
        payload: Sequence[float] | torch.Tensor = (),
    ) -> torch.Tensor:
        """Share a failure flag and a few numbers with every rank; raise on all if one failed.

        Args:
            error: this rank's exception, or None.
            where: what was being done, for the messages (e.g. "in a Hessian-vector product").
            payload: numbers to share (same length on every rank; a failed rank may send
                anything of that length).

        Returns:
            A float64 ``(world_size, len(payload))`` tensor on the CPU: every rank's payload.

        Raises:
            The local error on the failing rank(s); on the others the same
            :class:`OperatorError` subclass with the failing rank's message (or
            :class:`DistributedError` for other exception types).
        """
        row = torch.zeros(1 + len(payload), dtype=torch.float64)
        row[0] = 0.0 if error is None else 1.0
        if len(payload):
            row[1:] = torch.as_tensor(payload, dtype=torch.float64).reshape(-1).cpu()
        row = row.to(self.device)
        rows = [torch.empty_like(row) for _ in range(self.world_size)]
        torch.distributed.all_gather(rows, row, group=self.group)
        table = torch.stack(rows).cpu()
        if bool((table[:, 0] != 0).any()):
            self._raise_everywhere(error, where)
        return table[:, 1:]

    def _raise_everywhere(self, error: BaseException | None, where: str) -> None:
        info = None if error is None else (type(error).__name__, str(error))
        infos: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(infos, info, group=self.group)
        if error is not None:
            raise error
        r, (name, msg) = next((i, x) for i, x in enumerate(infos) if x is not None)
        others = [self.global_rank(i) for i, x in enumerate(infos) if x is not None]
        text = (
            f"rank {self.global_rank(r)} failed {where} ({name}: {msg}); every rank of the "
            f"process group raises so that none is left waiting in a collective "
            f"(failed ranks: {others})"
        )
        from kappa_gpu.operators._validate import DistributedError

        cls = _replayable().get(name)
        if cls is not None:
            raise cls(text)
        raise DistributedError(text)

    def check_identical(self, sums: torch.Tensor, what: str, fix: str) -> None:
        """Raise :class:`DistributedError` on every rank if the rows of ``sums`` differ.

        Args:
            sums: the ``(world_size, m)`` table returned by :meth:`exchange` (every rank holds
                the same table, so every rank takes the same branch).
            what: what the numbers are checksums of.
            fix: what to do about a mismatch.
        """
        if sums.shape[0] <= 1 or bool((sums == sums[0]).all()):
            return
        from kappa_gpu.operators._validate import DistributedError

        rows = range(sums.shape[0])
        bad = [self.global_rank(i) for i in rows if not torch.equal(sums[i], sums[0])]
        raise DistributedError(
            f"{what} differ between ranks (rank {self.global_rank(0)} vs ranks {bad}); every "
            f"rank must hold the same values for the ranks to compute the same operator. {fix}"
        )


def _field_hash(value: Any) -> float:
    """A 48-bit hash of ``repr(value)`` as an exact float64 (the same on every rank)."""
    import hashlib

    digest = hashlib.blake2b(repr(value).encode(), digest_size=6).digest()
    return float(int.from_bytes(digest, "big"))


def agree_arguments(
    communicator: Communicator, fields: dict[str, Any], where: str,
    error: BaseException | None = None,
) -> None:
    """Before the first variable-sized collective of a call: raise on every rank if one rank's
    argument check failed (``error``) or the ranks passed different ``fields``.

    Collective, one fixed-length all-gather (the number of fields is fixed by the calling code,
    the same on every rank). Without it, ranks with different arguments ran different
    collectives: a gloo abort, a hang until the process group's timeout, or another check's
    wrong diagnosis (review cases: modes, dtype, variant, params, k).
    """
    names = list(fields)
    table = communicator.exchange(error, f"checking the arguments of {where}",
                                  [_field_hash(fields[n]) for n in names])
    differ = [n for j, n in enumerate(names) if not bool((table[:, j] == table[0, j]).all())]
    if differ:
        from kappa_gpu.operators._validate import DistributedError

        mine = ", ".join(f"{n}={fields[n]!r}" for n in differ)
        raise DistributedError(
            f"the ranks called {where} with different {', '.join(differ)} (this rank, "
            f"{communicator.global_rank(communicator.rank)}: {mine}); every rank must pass the "
            "same arguments for the ranks to run the same collectives"
        )


def checksum(ts: Sequence[torch.Tensor] | torch.Tensor) -> list[float]:
    """Two float64 checksums (sum, 2-norm) of a tensor or of several, for cross-rank checks.

    One read pass, accumulated in float64 without a float64 copy. NaN and infinities are mapped
    to fixed finite stand-ins so that equal inputs give equal checksums.
    """
    if isinstance(ts, torch.Tensor):
        ts = [ts]
    parts = [
        torch.stack(
            [torch.sum(t, dtype=torch.float64), torch.linalg.vector_norm(t, dtype=torch.float64)]
        )
        for t in ts
        if t.numel()
    ]
    if not parts:
        return [0.0, 0.0]
    total = torch.stack([p.to(parts[0].device) for p in parts]).sum(0)
    return torch.nan_to_num(total, nan=1.2345e300, posinf=5.4321e300, neginf=-5.4321e300).tolist()


# -- what the model is ------------------------------------------------------------------------
def _sharded_types() -> tuple[tuple[type, str], ...]:
    # Read from sys.modules, not imported: importing torch.distributed.fsdp costs ~2 s, and a
    # model cannot be FSDP-wrapped unless its user imported it already.
    fsdp = sys.modules.get("torch.distributed.fsdp")
    out: list[tuple[type, str]] = []
    for attr, name in (
        ("FSDPModule", "FSDP2 (torch.distributed.fsdp.fully_shard)"),
        ("FullyShardedDataParallel", "FSDP (FullyShardedDataParallel)"),
    ):
        cls = getattr(fsdp, attr, None)
        if isinstance(cls, type):
            out.append((cls, name))
    return tuple(out)


def _dtensor_type() -> type | None:
    tensor_mod = sys.modules.get("torch.distributed.tensor")  # loaded by whoever made DTensors
    cls = getattr(tensor_mod, "DTensor", None)
    return cls if isinstance(cls, type) else None


def sharding_of(model: torch.nn.Module) -> str | None:
    """Name the sharding scheme of ``model`` (FSDP2, FSDP, DTensor parameters), or None."""
    kinds = _sharded_types()
    for m in model.modules():
        for cls, name in kinds:
            if isinstance(m, cls):
                return name
    dtensor = _dtensor_type()
    if dtensor is not None:
        for n, p in model.named_parameters():
            if isinstance(p, dtensor):
                return f"DTensor parameters (e.g. {n!r}: tensor parallelism or FSDP2)"
    return None


def check_not_sharded(model: torch.nn.Module) -> None:
    """Raise :class:`UnsupportedConfigurationError` for an FSDP/FSDP2/DTensor-sharded model.

    Cheap (a walk over the modules and parameters); called first, so that the user hears
    about the sharding before anything else (a missing optimizer state, a bad batch).
    """
    if not isinstance(model, torch.nn.Module):
        return  # the builders raise their own TypeError
    kind = sharding_of(model)
    if kind is not None:
        raise _unsupported_sharding(kind)


def _unsupported_sharding(kind: str) -> UnsupportedConfigurationError:
    from kappa_gpu.operators._validate import UnsupportedConfigurationError

    return UnsupportedConfigurationError(
        f"the model is sharded with {kind}; kappa_gpu does not support sharded parameters yet: "
        "its Krylov vectors are full, replicated copies of the parameters. Supported: plain "
        "models and DistributedDataParallel (products averaged over the process group). What "
        "to do: estimate on an unsharded copy -- gather the full model and optimizer state "
        "(torch.distributed.checkpoint.state_dict.get_model_state_dict / "
        "get_optimizer_state_dict with StateDictOptions(full_state_dict=True, "
        "cpu_offload=True)), load them into a plain copy of the model and of the optimizer, and "
        "call estimate on that copy: on one rank (no process group), or DDP-wrapped on a "
        "subgroup whose ranks each hold a copy (process_group=...)"
    )


def resolve_model(model: torch.nn.Module, process_group: Any = None) -> tuple[torch.nn.Module, Any]:
    """The plain module to differentiate and the process group to average over (or None).

    Unwraps ``DistributedDataParallel`` (remembering its process group), ``DataParallel`` and
    ``torch.compile`` modules, in any nesting.

    Args:
        model: the model as the user trains it.
        process_group: None (default: the DDP wrapper's group if the model is DDP-wrapped and
            ``torch.distributed`` is initialized, else no communication) or a
            ``ProcessGroup`` (e.g. ``torch.distributed.group.WORLD`` or one from
            ``torch.distributed.new_group``) to average over.

    Returns:
        ``(module, group)``; ``group`` is None when there is nothing to communicate (no
        group, or a group of one rank).

    Raises:
        UnsupportedConfigurationError: FSDP/FSDP2/DTensor-sharded parameters; SyncBatchNorm in
            train mode under a process group of size > 1.
        ValueError: a ``process_group`` without an initialized ``torch.distributed``, or one
            this rank is not a member of.
    """
    ddp_group = None
    seen: set[int] = set()
    while id(model) not in seen:
        seen.add(id(model))
        kind = sharding_of(model)
        if kind is not None:
            raise _unsupported_sharding(kind)
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            ddp_group = getattr(model, "process_group", None)
            model = model.module
        elif isinstance(model, torch.nn.DataParallel):  # one process: nothing to average
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):  # torch.compile
            model = model._orig_mod
    group = ddp_group if process_group is None else process_group
    if process_group is not None and not _dist_ready():
        raise ValueError(
            "process_group was given but torch.distributed is not initialized; call "
            "torch.distributed.init_process_group first, or pass process_group=None"
        )
    if group is not None and _dist_ready():
        dist = torch.distributed
        if dist.get_rank(group) < 0:
            raise ValueError(
                f"this process (rank {dist.get_rank()}) is not a member of the process_group; "
                "call estimate only on the ranks of the group"
            )
        if dist.get_world_size(group) <= 1:
            group = None
    else:
        group = None
    if _dist_ready() and torch.distributed.get_world_size() > 1:
        from kappa_gpu.operators._validate import UnsupportedConfigurationError

        for name, m in model.named_modules():
            if isinstance(m, torch.nn.SyncBatchNorm) and m.training:
                raise UnsupportedConfigurationError(
                    f"module {name or type(m).__name__!r} is a SyncBatchNorm in train mode: its "
                    "forward pass runs collectives of its own (statistics gathered across "
                    "ranks), which the HVPs cannot run through. Put the SyncBatchNorm layers in "
                    "eval mode for the estimate (running statistics), or estimate on a copy with "
                    "plain BatchNorm layers"
                )
    return model, group


def broadcast_generator(generator: torch.Generator, communicator: Communicator | None) -> None:
    """Give ``generator`` the state of the group's first rank, on every rank (collective).

    The start vectors of the eigen-solvers are drawn from it, so every rank starts from the same
    vectors even when the ranks were handed differently seeded generators. No-op without a
    communicator.
    """
    if communicator is None:
        return
    state = generator.get_state().to(communicator.device)
    torch.distributed.broadcast(state, src=communicator.src, group=communicator.group)
    generator.set_state(state.cpu())


def communicator_of(op: Any) -> Communicator | None:
    """The :class:`Communicator` an operator built by :mod:`kappa_gpu.operators` averages over."""
    engine = getattr(op, "_engine", None)
    return getattr(engine, "comm", None)


# -- for KappaMonitor ------------------------------------------------------------------------
def call_communicator(model: torch.nn.Module, process_group: Any = None) -> Communicator | None:
    """The communicator a call with ``model`` and ``process_group`` averages over, or None
    (resolution errors are left to the call itself, which raises them on every rank alike)."""
    if not _dist_ready():
        return None
    try:
        _, group = resolve_model(model, process_group)
    except Exception:  # noqa: BLE001
        return None
    if group is None:
        return None
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    return Communicator(group, device)


def model_communicator(model: torch.nn.Module) -> Communicator | None:
    """The communicator ``estimate`` would use for ``model`` by default, or None.

    Non-None for a ``DistributedDataParallel`` model (possibly under ``torch.compile``) whose
    process group has more than one rank, with ``torch.distributed`` initialized.
    """
    if not _dist_ready():
        return None
    try:
        _, group = resolve_model(model)
    except Exception:  # noqa: BLE001 - unsupported models fail in estimate, on every rank
        return None
    if group is None:
        return None
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    return Communicator(group, device)


def agree_before_estimate(
    communicator: Communicator,
    error: BaseException | None,
    loss: float,
    maxiter: int | None,
) -> tuple[float, int | None]:
    """Before a collective estimate: raise on every rank if one failed; share loss and maxiter.

    Collective. A monitor prepares each estimate locally (fetching the batch, the loss, a
    time-budget ``maxiter``); a rank whose preparation failed must not skip the estimate while
    the others enter it (they would wait forever), and all ranks must run the solver with the
    same ``maxiter`` (one computed from local timings differs between ranks).

    Returns:
        ``(mean of the ranks' losses, rank 0's maxiter)``.
    """
    m = -1.0 if maxiter is None else float(maxiter)
    table = communicator.exchange(error, "while preparing an estimate", [loss, m])
    first = float(table[0, 1])
    return float(table[:, 0].mean()), (None if first < 0 else int(first))
