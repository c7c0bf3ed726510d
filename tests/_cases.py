"""Test case factories and dense oracles for the operators.

A case is a tuple ``(model, optimizer, loss_fn, batch)``: a tiny float64 model (n ~ 20-60
parameters), its optimizer after a few real ``optimizer.step()`` calls (so the state exists and
Adam's ``exp_avg_sq`` is well away from 0), the loss and the batch. The factories are
deterministic: they fork the global RNG and seed it, so they leave it as it was.

Oracles:

- :func:`fd_jacobian` — central finite differences of REAL ``optimizer.step()`` calls: deepcopy
  model and optimizer, perturb one entry of the state (a parameter or a ``momentum_buffer`` /
  ``exp_avg`` / ``exp_avg_sq`` entry), ``loss.backward()`` on the batch, ``optimizer.step()``,
  flatten the new state.
- :func:`dense_hessian` — ``torch.autograd.functional.hessian`` of the flattened loss.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

Case = tuple[nn.Module, torch.optim.Optimizer, Callable, Any]


# -- losses (written without F.mse_loss: its mean reduction has no forward-mode rule in torch
# 2.13, which would push every MSE case onto the reverse-over-reverse fallback) ----------------
def mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((out - target) ** 2).mean()


def cross_entropy(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, target)


_ACTS = {"tanh": nn.Tanh, "gelu": nn.GELU, "relu": nn.ReLU}


def make_model(
    arch: str = "mlp", act: str = "tanh", *, n_in: int = 3, hidden: int = 6, n_out: int = 2
) -> nn.Sequential:
    """``mlp``: Linear-act-Linear; ``bn``: Linear(no bias)-BatchNorm-act-Linear;
    ``dropout_bn``: Linear(no bias)-BatchNorm-act-Dropout(0.25)-Linear; ``unused``: an MLP
    with an extra Linear the forward never calls (its gradient is None)."""
    A = _ACTS[act]
    if arch == "mlp":
        return nn.Sequential(nn.Linear(n_in, hidden), A(), nn.Linear(hidden, n_out))
    if arch == "bn":
        # no bias before BatchNorm: it would have an exactly-zero gradient (BN removes the mean)
        # and Adam's exp_avg_sq would sit at ~1e-34
        return nn.Sequential(
            nn.Linear(n_in, hidden, bias=False), nn.BatchNorm1d(hidden), A(),
            nn.Linear(hidden, n_out),
        )  # fmt: skip
    if arch == "dropout_bn":
        return nn.Sequential(
            nn.Linear(n_in, hidden, bias=False), nn.BatchNorm1d(hidden), A(), nn.Dropout(0.25),
            nn.Linear(hidden, n_out),
        )  # fmt: skip
    if arch == "unused":
        return _WithUnused(n_in, hidden, n_out, A)
    raise ValueError(arch)


class _WithUnused(nn.Module):
    def __init__(self, n_in, hidden, n_out, A):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(n_in, hidden), A(), nn.Linear(hidden, n_out))
        self.head = nn.Linear(hidden, 1)  # never called

    def forward(self, x):
        return self.body(x)


def make_batch(
    n_in: int = 3, n_out: int = 2, *, n: int = 16, classify: bool = False, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + seed)
    x = torch.randn(n, n_in, generator=gen, dtype=torch.float64)
    if classify:
        return x, torch.randint(0, n_out, (n,), generator=gen)
    return x, torch.randn(n, n_out, generator=gen, dtype=torch.float64)


def mean_loss(model: nn.Module, loss_fn: Callable, batch: Any) -> torch.Tensor:
    """The loss the operators use: ``loss_fn(model(x), y)``, mean over a list of batches."""
    pairs = [batch] if isinstance(batch, tuple) else list(batch)
    losses = [loss_fn(model(x), y) for x, y in pairs]
    return sum(losses[1:], losses[0]) / len(losses) if len(losses) > 1 else losses[0]


def take_steps(model, optimizer, loss_fn, batch, steps: int, seed: int = 0) -> None:
    """``steps`` real training steps (zero_grad, backward, step) on ``batch``."""
    for k in range(steps):
        optimizer.zero_grad(set_to_none=True)
        torch.manual_seed(seed + k)
        mean_loss(model, loss_fn, batch).backward()
        optimizer.step()


def _groups(model: nn.Module, two_groups: bool, group2: dict | None) -> list[dict]:
    params = [p for p in model.parameters() if p.requires_grad]
    if not two_groups:
        return [{"params": params}]
    first = list(next(m for m in model.modules() if isinstance(m, nn.Linear)).parameters())
    ids = {id(p) for p in first}
    rest = [p for p in params if id(p) not in ids]
    return [{"params": first}, {"params": rest, **(group2 or {})}]


def sgd_case(
    arch: str = "mlp",
    act: str = "tanh",
    *,
    lr: float = 0.1,
    momentum: float = 0.9,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    maximize: bool = False,
    two_groups: bool = False,
    group2: dict | None = None,
    two_batches: bool = False,
    classify: bool = False,
    steps: int = 3,
    seed: int = 0,
) -> Case:
    """A tiny model and ``torch.optim.SGD`` after ``steps`` real steps.

    ``two_groups``: the first Linear in group 0, the rest in group 1 with the ``group2``
    overrides (default: half the lr, momentum 0.5, other weight decay and dampening).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = make_model(arch, act, n_out=3 if classify else 2).double()
        if two_groups and group2 is None:
            group2 = {"lr": lr / 2, "momentum": 0.5 if momentum else 0.0,
                      "weight_decay": weight_decay + 0.03,
                      "dampening": 0.0 if nesterov else dampening / 2 + 0.1}  # fmt: skip
        opt = torch.optim.SGD(
            _groups(model, two_groups, group2), lr=lr, momentum=momentum, dampening=dampening,
            weight_decay=weight_decay, nesterov=nesterov, maximize=maximize,
        )  # fmt: skip
        loss_fn = cross_entropy if classify else mse
        n_out = 3 if classify else 2
        batch: Any = make_batch(n_out=n_out, classify=classify, seed=seed)
        if two_batches:
            batch = [batch, make_batch(n_out=n_out, classify=classify, n=10, seed=seed + 1)]
        take_steps(model, opt, loss_fn, batch, steps, seed=seed)
    return model, opt, loss_fn, batch


def adam_case(
    arch: str = "mlp",
    act: str = "tanh",
    *,
    kind: str = "adam",
    lr: float = 1e-2,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    maximize: bool = False,
    amsgrad: bool = False,
    two_groups: bool = False,
    group2: dict | None = None,
    classify: bool = False,
    steps: int = 5,
    seed: int = 0,
) -> Case:
    """A tiny model and ``torch.optim.Adam`` (``kind="adam"``), ``AdamW`` (``"adamw"``) or
    ``Adam(decoupled_weight_decay=True)`` (``"adam_decoupled"``) after ``steps`` real steps.

    ``two_groups`` default overrides for group 1: other lr, betas (0.8, 0.99), eps, weight decay.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = make_model(arch, act, n_out=3 if classify else 2).double()
        if two_groups and group2 is None:
            group2 = {"lr": lr * 0.5, "betas": (0.8, 0.99), "eps": 1e-7,
                      "weight_decay": weight_decay + 0.05}  # fmt: skip
        groups = _groups(model, two_groups, group2)
        common = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                      maximize=maximize, amsgrad=amsgrad)  # fmt: skip
        if kind == "adam":
            opt: torch.optim.Optimizer = torch.optim.Adam(groups, **common)
        elif kind == "adamw":
            opt = torch.optim.AdamW(groups, **common)
        elif kind == "adam_decoupled":
            opt = torch.optim.Adam(groups, decoupled_weight_decay=True, **common)
        else:
            raise ValueError(kind)
        loss_fn = cross_entropy if classify else mse
        batch = make_batch(n_out=3 if classify else 2, classify=classify, seed=seed)
        take_steps(model, opt, loss_fn, batch, steps, seed=seed)
    return model, opt, loss_fn, batch


#: Named zero-argument factories, for ``pytest.mark.parametrize``.
SGD_CASES: dict[str, Callable[[], Case]] = {
    "plain-tanh": lambda: sgd_case(act="tanh", momentum=0.0),
    "plain-wd-relu-2groups": lambda: sgd_case(
        act="relu", momentum=0.0, weight_decay=1e-2, two_groups=True
    ),
    "heavy-tanh": lambda: sgd_case(act="tanh"),
    "heavy-gelu-dampening": lambda: sgd_case(act="gelu", dampening=0.3),
    "heavy-wd-bn": lambda: sgd_case("bn", act="tanh", weight_decay=1e-2),
    "heavy-2groups": lambda: sgd_case(
        act="gelu", weight_decay=1e-2, dampening=0.2, two_groups=True
    ),
    "heavy-maximize": lambda: sgd_case(act="tanh", lr=0.02, maximize=True, weight_decay=1e-2),
    "heavy-2batches-ce": lambda: sgd_case(act="gelu", classify=True, two_batches=True),
    "heavy-dropout-bn": lambda: sgd_case("dropout_bn", act="gelu", weight_decay=1e-3),
    "nesterov-relu": lambda: sgd_case(act="relu", nesterov=True),
    "nesterov-wd-bn-2groups": lambda: sgd_case(
        "bn", act="gelu", nesterov=True, weight_decay=1e-2, two_groups=True
    ),
    "nesterov-maximize-gelu": lambda: sgd_case(act="gelu", lr=0.02, nesterov=True, maximize=True),
    "mixed-momentum-2groups": lambda: sgd_case(
        act="tanh", two_groups=True, group2={"momentum": 0.0, "lr": 0.05}
    ),
    "heavy-unused-param": lambda: sgd_case("unused", act="tanh", weight_decay=1e-2),
}

ADAM_CASES: dict[str, Callable[[], Case]] = {
    "adam-tanh": lambda: adam_case(act="tanh"),
    "adam-wd-gelu": lambda: adam_case(act="gelu", weight_decay=1e-2),
    "adam-maximize-tanh": lambda: adam_case(act="tanh", maximize=True, weight_decay=1e-2),
    "adam-relu-ce": lambda: adam_case(act="relu", classify=True),
    "adam-bn-2groups": lambda: adam_case("bn", act="tanh", weight_decay=1e-2, two_groups=True),
    "adamw-gelu": lambda: adam_case(act="gelu", kind="adamw", weight_decay=0.1),
    "adamw-bn": lambda: adam_case("bn", act="gelu", kind="adamw", weight_decay=0.05),
    "adamw-2groups-maximize": lambda: adam_case(
        act="tanh", kind="adamw", weight_decay=0.1, two_groups=True, maximize=True
    ),
    "adam-decoupled-tanh": lambda: adam_case(act="tanh", kind="adam_decoupled", weight_decay=0.1),
    "adam-dropout-bn": lambda: adam_case("dropout_bn", act="tanh", weight_decay=1e-3),
    "adam-eps-2groups": lambda: adam_case(act="gelu", eps=1e-3, two_groups=True),
    "adamw-unused-param": lambda: adam_case("unused", act="tanh", kind="adamw", weight_decay=0.1),
}


# -- the optimizer state, flattened ---------------------------------------------------------
def trainable(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The optimizer's trainable parameters in state order (groups in order)."""
    return [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]


def default_blocks(optimizer: torch.optim.Optimizer, variant: str | None = "full") -> tuple:
    if isinstance(optimizer, torch.optim.SGD):
        if any(float(g["momentum"]) != 0.0 for g in optimizer.param_groups):
            return ("theta", "momentum_buffer")
        return ("theta",)
    if variant == "frozen":
        return ("theta", "exp_avg")
    return ("theta", "exp_avg", "exp_avg_sq")


def flat_state(optimizer: torch.optim.Optimizer, blocks: Sequence[str]) -> torch.Tensor:
    """The state (float64), blocks in order, params in optimizer order; missing entries 0."""
    parts = []
    for name in blocks:
        for p in trainable(optimizer):
            t = p.detach() if name == "theta" else optimizer.state.get(p, {}).get(name)
            parts.append(torch.zeros(p.numel()) if t is None else t.reshape(-1))
    return torch.cat([t.to(torch.float64) for t in parts])


def set_flat_state(optimizer: torch.optim.Optimizer, blocks: Sequence[str], x: torch.Tensor):
    """Write ``x`` into the parameters and the state (entries without state are skipped)."""
    o = 0
    with torch.no_grad():
        for name in blocks:
            for p in trainable(optimizer):
                k = p.numel()
                t = p if name == "theta" else optimizer.state.get(p, {}).get(name)
                if t is not None:
                    t.copy_(x[o : o + k].reshape(t.shape).to(t.dtype))
                o += k


def real_step(model, optimizer, loss_fn, batch, x, blocks, seed: int = 0,
              clip: tuple[str, float] | None = None) -> torch.Tensor:
    """The state after one real ``optimizer.step()`` from state ``x`` (on deep copies).

    ``clip``: ``("norm", max_norm)`` or ``("value", clip_value)``: the step runs
    ``torch.nn.utils.clip_grad_norm_`` / ``clip_grad_value_`` on the optimizer's parameters
    between ``backward()`` and ``step()``, as a training loop that clips does."""
    m2, o2 = copy.deepcopy((model, optimizer))
    set_flat_state(o2, blocks, x)
    o2.zero_grad(set_to_none=True)
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)  # as the operators seed it: same dropout mask
        loss = mean_loss(m2, loss_fn, batch)
    loss.backward()
    if clip is not None:
        if clip[0] == "norm":
            torch.nn.utils.clip_grad_norm_(trainable(o2), clip[1])
        else:
            torch.nn.utils.clip_grad_value_(trainable(o2), clip[1])
    o2.step()
    return flat_state(o2, blocks)


def fd_jacobian(
    model,
    optimizer,
    loss_fn,
    batch,
    *,
    blocks: Sequence[str] | None = None,
    rel_step: float = 1e-6,
    seed: int = 0,
    clip: tuple[str, float] | None = None,
) -> torch.Tensor:
    """Central finite-difference Jacobian of real ``optimizer.step()`` calls (float64).

    The step of entry ``i`` is ``rel_step * max(|x_i|, 1e-2 * rms(block))``, relative to the
    entry with a floor so that entries near 0 still get a step on the block's scale; for
    ``exp_avg_sq`` it is ``rel_step * v_i`` (no floor): Adam's ``sqrt(v)`` is curved on the
    scale of ``v_i`` itself, so a step on the block's scale would be far too large where
    ``v_i << rms(v)``. ``blocks`` defaults to the full
    state (``("theta", "exp_avg", "exp_avg_sq")`` for Adam). ``seed`` fixes dropout's mask;
    ``clip`` clips the gradient in each step (:func:`real_step`).
    """
    with one_thread():
        return _fd_jacobian(model, optimizer, loss_fn, batch, blocks, rel_step, seed, clip)


def rel_err(A: torch.Tensor, B: torch.Tensor) -> float:
    """``||A - B|| / ||B||`` (Frobenius), the tests' relative error."""
    return ((A - B).norm() / B.norm()).item()


@contextlib.contextmanager
def one_thread():
    """Run with one intra-op thread: on tiny models more threads only add synchronization,
    and on a loaded machine their spin-waits make each step ~10x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _fd_jacobian(model, optimizer, loss_fn, batch, blocks, rel_step, seed, clip=None):
    blocks = tuple(blocks or default_blocks(optimizer))
    x0 = flat_state(optimizer, blocks)
    n = x0.numel() // len(blocks)
    J = torch.empty(x0.numel(), x0.numel(), dtype=torch.float64)
    for b, name in enumerate(blocks):
        block = x0[b * n : (b + 1) * n]
        rms = block.pow(2).mean().sqrt().item() or 1.0
        # exp_avg_sq: purely relative (sqrt(v) is curved on the scale of v; v > 0 here)
        floor = 0.0 if name == "exp_avg_sq" else 1e-2 * rms
        for i in range(b * n, (b + 1) * n):
            h = rel_step * (max(abs(x0[i].item()), floor) or rms)
            xp, xm = x0.clone(), x0.clone()
            xp[i] += h
            xm[i] -= h
            step = (xp[i] - xm[i]).item()  # the representable step actually taken
            fp = real_step(model, optimizer, loss_fn, batch, xp, blocks, seed, clip)
            fm = real_step(model, optimizer, loss_fn, batch, xm, blocks, seed, clip)
            J[:, i] = (fp - fm) / step
    return J


class FlatLoss:
    """``f(flat) -> loss`` with respect to ``params`` of ``model``, on a deep copy of the model
    (BatchNorm may update running statistics there), RNG seeded with ``seed`` at every call."""

    def __init__(self, model, loss_fn, batch, params: Sequence[torch.Tensor], seed: int = 0):
        name_of = {id(p): n for n, p in model.named_parameters()}
        self.names = [name_of[id(p)] for p in params]
        self.model, self.loss_fn, self.batch, self.seed = copy.deepcopy(model), loss_fn, batch, seed
        self.shapes = [p.shape for p in params]
        self.numels = [p.numel() for p in params]
        self.x0 = torch.cat([p.detach().reshape(-1) for p in params])

    def __call__(self, flat: torch.Tensor) -> torch.Tensor:
        tensors, o = {}, 0
        for name, shape, k in zip(self.names, self.shapes, self.numels, strict=True):
            tensors[name] = flat[o : o + k].reshape(shape)
            o += k
        torch.manual_seed(self.seed)
        pairs = [self.batch] if isinstance(self.batch, tuple) else list(self.batch)
        losses = [
            self.loss_fn(torch.func.functional_call(self.model, tensors, (x,)), y) for x, y in pairs
        ]
        return sum(losses[1:], losses[0]) / len(losses) if len(losses) > 1 else losses[0]


def dense_hessian(model, loss_fn, batch, params: Sequence[torch.Tensor], seed: int = 0):
    """The dense Hessian (parameters' dtype) of the loss with respect to ``params`` of ``model``."""
    f = FlatLoss(model, loss_fn, batch, params, seed)
    with torch.random.fork_rng(devices=[]):
        return torch.autograd.functional.hessian(f, f.x0)


def dense_gradient(model, loss_fn, batch, params: Sequence[torch.Tensor], seed: int = 0):
    """The gradient (flattened, in the parameters' dtype) of the loss with respect to ``params``."""
    f = FlatLoss(model, loss_fn, batch, params, seed)
    with torch.random.fork_rng(devices=[]):
        x = f.x0.clone().requires_grad_(True)
        return torch.autograd.grad(f(x), x)[0]


def cast_case(
    case: Case, dtype: torch.dtype | None = None, device: torch.device | str | None = None
) -> Case:
    """The same case in another dtype and/or on another device: model, optimizer (its state is
    cast and moved by ``load_state_dict``) and batch."""
    model, opt, loss_fn, batch = case
    m2 = copy.deepcopy(model).to(device=device, dtype=dtype)
    name_of = {id(p): n for n, p in model.named_parameters()}
    new_params = dict(m2.named_parameters())
    groups = [
        {**{k: v for k, v in g.items() if k != "params"},
         "params": [new_params[name_of[id(p)]] for p in g["params"]]}
        for g in opt.param_groups
    ]  # fmt: skip
    o2 = type(opt)(groups)
    o2.load_state_dict(opt.state_dict())

    def conv(t):
        if isinstance(t, torch.Tensor):
            return t.to(device=device, dtype=dtype if t.is_floating_point() else None)
        if isinstance(t, (tuple, list)):
            return type(t)(conv(u) for u in t)
        return t

    return m2, o2, loss_fn, conv(batch)
