"""Hessian-vector products of a user's model, matrix-free, and the Hessian as an operator.

The loss follows curvlinops/PyHessian: ``loss_fn(model(inputs), targets)`` for
``batch = (inputs, targets)``, or the mean of it over a list of such batches.

How a product ``H v`` is computed (``hvp=`` of the constructors; the engine picks once and
remembers):

1. **reverse-over-reverse with a cached graph** (``hvp="auto"``, the default): the gradient is
   computed once, at build time, with ``create_graph=True``; each product is one more backward
   pass through that graph (``torch.autograd.grad(..., retain_graph=True)``), one column at a
   time. The forward pass and the first backward pass are paid once per operator instead of
   once per product: 2-3x faster than forward-over-reverse on a CPU (1.06M-parameter MLP,
   batch 64: 12.8 vs 26.1 ms; 95k-parameter tanh MLP, batch 256: 2.4 vs 7.1 ms; a 2-layer
   transformer: 25.7 vs 63.8 ms; ``bench/bench_operators.py``). The price is memory: the
   graph (the activations and the first backward pass's intermediates, about what one training
   step holds at its peak; for a list of batches, that of each batch together) lives as long as
   the operator.
2. **forward-over-reverse** (``hvp="forward"``, and the fallback of ``"auto"`` when the model
   or the loss has no double backward, e.g. a custom ``autograd.Function`` whose backward
   raises when differentiated but which has a ``jvp``): ``torch.func.jvp`` of
   ``torch.func.grad`` of the loss written with ``torch.func.functional_call``; several
   columns at once through
   ``torch.func.vmap(..., randomness="same")``. Costs about one forward and one backward pass
   with dual numbers per column, and keeps nothing between products; but a batched product
   holds the dual activations of all its columns at once (``kg.estimate`` of a
   10^7-parameter MLP peaked at 3.65 GiB with it, 3.04 GiB with the default, which applies the
   columns one after the other through the kept graph). Its own fallback, when
   forward-mode AD lacks an op the model or the loss uses (``F.huber_loss`` or
   ``F.mse_loss(reduction="mean")`` in torch 2.13, or a custom ``autograd.Function`` without
   ``jvp``), is reverse-over-reverse rebuilding the graph for each product (nothing cached, as
   ``"forward"`` promises). If ``vmap`` fails on the model (data-dependent control flow, in-place
   ops on unbatched tensors), its columns are applied one at a time.

Each failure is detected once per operator, logged on the ``kappa_gpu`` logger, and
remembered; :attr:`HessianOperator.hvp_mode` says which path is in use. A gradient whose graph
does not lead back to the parameters, or that runs through a custom ``autograd.Function`` whose
backward is computed outside autograd (``once_differentiable``: torch puts an ``Error`` node in
front of a detached copy there, and double backward prunes the path without a word), raises
:class:`UnsupportedConfigurationError` at the first product, in either mode: its Hessian
products would silently read 0 or be wrong (one such tanh in a 2-layer MLP: relative error 0.91
in both modes, torch 2.13). The graph is searched once per operator (the kept one; forward mode
builds one at its first product and drops it); a forward-mode product that is exactly 0 for a
nonzero vector is also checked by double backward (a loss linear in the parameters, whose
gradient has no graph, keeps its zero products). A backward that detaches by other means is not
detectable this way.

Determinism and non-interference (what every product sees):

- **Randomness**: every evaluation of the loss runs inside ``torch.random.fork_rng`` with the
  CPU generator (and the CUDA generator of the parameters' device) seeded with the operator's
  ``seed``; under ``vmap`` randomness is ``"same"``. Dropout therefore draws the same mask in
  every product of one operator (and in the gradient computed at build time), and the global RNG
  state is left as it was.
- **Normalization layers** (``BatchNorm*``, ``InstanceNorm*`` with ``track_running_stats``) in
  train mode use the batch statistics, as in the training step, but their running statistics are
  not updated: they are passed as ``None`` to ``functional_call``. In eval mode they use the
  running statistics, read only. Other buffers a forward pass mutates in place are detected at
  build time and handed to each evaluation as fresh clones.
- The model's parameters, ``.grad``, buffers and train/eval mode are never written. The
  operator reads the parameters when applied; if they change (an optimizer step) or a module's
  train/eval mode changes, applying the operator raises :class:`StaleOperatorError`: build a new
  one at the new point.
- Parameters are as the training step sees them; every parameter not differentiated (frozen,
  or not in ``params``) is a constant.
- ``nn.Embedding(padding_idx=p)`` with a differentiated weight is evaluated with
  ``padding_idx=None`` (restored after each evaluation; the forward pass is the same): the
  gradient and the products are those of the loss itself. torch's own second derivatives
  through ``padding_idx`` follow neither the loss nor the masked gradient. The update operators
  apply the step's mask of row ``p`` themselves; where the weight is also used elsewhere (a
  tied output layer) and the padding positions are scored, the step drops only the lookups'
  share of the row's gradient, and the engine reads those lookups through a variable of their
  own (:meth:`_HVPEngine.split_padding`, reverse mode) to give that step's exact Jacobian.

Under ``torch.distributed`` (details in :mod:`kappa_gpu._distributed`): a
``DistributedDataParallel`` model is unwrapped to ``model.module`` (``DataParallel`` and
``torch.compile`` wrappers too), each rank differentiates its own loss on its own batch, and the
gradient and every product are averaged over the process group (one ``all_reduce`` each, after
an all-gather of a status row so that all ranks raise together when one fails). FSDP/FSDP2 and
other DTensor-sharded models raise :class:`UnsupportedConfigurationError`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.func import functional_call, grad, jvp, vmap
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

from kappa_gpu._autocast import autocast_off, without_autocast
from kappa_gpu._distributed import Communicator, agree_arguments, checksum, resolve_model
from kappa_gpu._linop import LinearOperator
from kappa_gpu.operators._validate import (
    BatchError,
    NonFiniteError,
    NoTrainableParametersError,
    ParameterMismatchError,
    StaleOperatorError,
    UnsupportedConfigurationError,
    describe,
    normalize_batches,
)

__all__ = [
    "HessianOperator",
    "hessian_operator",
    "FORWARD_OVER_REVERSE",
    "REVERSE_OVER_REVERSE",
    "HVP_CHOICES",
]

logger = logging.getLogger("kappa_gpu")

FORWARD_OVER_REVERSE = "forward-over-reverse"
REVERSE_OVER_REVERSE = "reverse-over-reverse"
#: the ``hvp=`` values: the preferred product (module docs); the other one is the fallback
HVP_CHOICES = ("auto", "forward")

try:  # the base of BatchNorm* and InstanceNorm*: the modules with running statistics
    from torch.nn.modules.batchnorm import _NormBase
except ImportError:  # pragma: no cover - private name; fall back to the public classes
    _NormBase = (torch.nn.modules.batchnorm._BatchNorm,)  # type: ignore[assignment]

_RUNNING_STATS = ("running_mean", "running_var", "num_batches_tracked")


class _CutGraphError(UnsupportedConfigurationError):
    """The gradient's graph does not reach the parameters (no second derivatives)."""


#: autograd's node for the outputs of a ``once_differentiable`` backward (``DelayedError``)
_CUT_NODES = frozenset({"Error", "DelayedError", "DelayedErrorBackward"})

_PARTIAL_CUT = (
    "the gradient's graph passes through a backward computed outside autograd (a custom "
    "autograd.Function whose backward is marked once_differentiable): second derivatives "
    "through it are dropped without an error, so Hessian-vector products would be silently "
    "wrong; give the Function a differentiable backward (torch operations on saved tensors) "
    "and a jvp"
)


def _cut_nodes(grads: Sequence[torch.Tensor | None]) -> int:
    """Nodes of the gradients' graph that stand for a ``once_differentiable`` backward.

    torch gives the outputs of such a backward a node that raises if differentiated (autograd's
    ``Error``, from ``DelayedError``) whose input is a detached copy, a leaf that is not a
    parameter: double backward prunes the path, and what flows through it is dropped without an
    error (measured in torch 2.13: a 2-layer MLP with one such tanh, relative error 0.91 in
    both HVP modes). One walk over the graph's nodes."""
    stack = [g.grad_fn for g in grads if g is not None and g.grad_fn is not None]
    seen: set = set()
    cuts = 0
    while stack:
        fn = stack.pop()
        if fn in seen:
            continue
        seen.add(fn)
        if type(fn).__name__ in _CUT_NODES:
            cuts += 1
        stack.extend(f for f, _ in fn.next_functions if f is not None)
    return cuts


_EMBEDDING_ARGS = ("input", "weight", "padding_idx", "max_norm", "norm_type",
                   "scale_grad_by_freq", "sparse")


def _padded_embedding_call(func, args, kwargs) -> tuple[dict[str, Any], int] | None:
    """``(the call's arguments by name, its padding row)`` for an ``F.embedding`` call with a
    ``padding_idx`` (normalized: -1 is the last row), else None."""
    if func is not torch.nn.functional.embedding:
        return None
    call = dict(zip(_EMBEDDING_ARGS, args, strict=False))
    call.update(kwargs)
    idx = call.get("padding_idx")
    if idx is None:
        return None
    return call, int(idx) % call["weight"].shape[0]


class _SplitLookups(TorchFunctionMode):
    """Route the lookups of padding rows through variables of their own.

    ``subs``: ``(weight, row, a)``. A call ``F.embedding(ids, weight, padding_idx=row)`` (the
    forward of an ``nn.Embedding(padding_idx=row)`` holding ``weight``, subclasses included)
    is evaluated without ``padding_idx`` and its outputs at ``ids == row`` are replaced by ``a``
    (the row's value: the forward pass is the same). Then the loss ``L(theta, a)`` has
    ``dL/dtheta`` = torch's masked gradient (the lookups' share of the row goes to ``a``), and
    the step's curvature is ``d/dtheta`` of that at ``a = theta[row]``. Other uses of the
    weight (a tied output layer, ``h @ emb.weight.T``) read ``weight`` as before.
    ``hits[j]``: how many calls ``subs[j]`` replaced."""

    def __init__(self, subs: Sequence[tuple[torch.Tensor, int, torch.Tensor]]):
        super().__init__()
        self.subs = list(subs)
        self.hits = [0] * len(self.subs)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        padded = _padded_embedding_call(func, args, kwargs)
        if padded is not None:
            call, prow = padded
            for j, (w, row, a) in enumerate(self.subs):
                if call["weight"] is w and prow == row:
                    self.hits[j] += 1
                    call["padding_idx"] = None
                    out = func(**call)
                    hit = (call["input"] == row).unsqueeze(-1)
                    return torch.where(hit, a.to(out.dtype), out)
        return func(*args, **kwargs)


class _DirectPadding(TorchFunctionMode):
    """Record ``F.embedding(ids, weight, padding_idx=p)`` calls on the differentiated
    ``leaves`` during one evaluation: calls outside an ``nn.Embedding`` module (whose
    ``padding_idx`` the engine sets to None while evaluating). ``rows``: ``{(leaf index,
    row)}``."""

    def __init__(self, leaves: Sequence[torch.Tensor]):
        super().__init__()
        self.index = {id(t): i for i, t in enumerate(leaves)}
        self.rows: set[tuple[int, int]] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        padded = _padded_embedding_call(func, args, kwargs)
        if padded is not None and id(padded[0]["weight"]) in self.index:
            self.rows.add((self.index[id(padded[0]["weight"])], padded[1]))
        return func(*args, **kwargs)


def _weight_sources(mod: torch.nn.Module) -> list[torch.Tensor]:
    """The tensors a module's ``weight`` comes from: a parametrization's originals (e.g.
    weight_norm's ``original0``/``original1``), else the weight itself."""
    plist = getattr(getattr(mod, "parametrizations", None), "weight", None)
    if plist is not None:
        return list(plist.parameters())
    w = getattr(mod, "weight", None)
    return [w] if isinstance(w, torch.Tensor) else []


class _HVPEngine:
    """Hessian-vector products of the loss with respect to ``params`` (flattened, in order).

    Internal: shared by :class:`HessianOperator` and the update operators, so that all of them
    count into one ``n_hvp``.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        loss_fn: Callable[[Any, Any], torch.Tensor],
        batch: Any,
        params: Sequence[torch.Tensor],
        *,
        seed: int = 0,
        dtype: torch.dtype | None = None,
        process_group: Any = None,
        hvp: str = "auto",
    ):
        if hvp not in HVP_CHOICES:
            raise ValueError(
                f"hvp must be one of {', '.join(repr(c) for c in HVP_CHOICES)}, got {hvp!r}"
            )
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if torch.is_inference_mode_enabled():
            raise UnsupportedConfigurationError(
                "called under torch.inference_mode(): autograd is off there, so there are no "
                "gradients or Hessian-vector products; call it outside inference_mode (under "
                "torch.no_grad() it works: the operators enable gradients where they need them)"
            )
        model, group = resolve_model(model, process_group)
        if not callable(loss_fn):
            raise TypeError(
                f"loss_fn must be callable as loss_fn(outputs, targets), got {loss_fn!r}"
            )
        self.model = model
        self.loss_fn = loss_fn
        self.batches = normalize_batches(batch)
        self.seed = int(seed)
        params = list(params)
        if not params:
            raise NoTrainableParametersError(
                "no trainable parameters to differentiate: every parameter has "
                "requires_grad=False (or the list is empty); unfreeze some with "
                "p.requires_grad_(True)"
            )
        name_of = {id(p): n for n, p in model.named_parameters()}
        names, seen = [], set()
        for i, p in enumerate(params):
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"parameter {i} is a {type(p).__name__}, not a tensor")
            if id(p) not in name_of:
                raise ParameterMismatchError(
                    f"parameter {i} (shape {tuple(p.shape)}) is not a parameter of the model "
                    f"({type(model).__name__}); build the optimizer on model.parameters() of "
                    "this model (after any .to()/deepcopy) and pass that same model"
                )
            if id(p) in seen:
                raise ParameterMismatchError(f"parameter {name_of[id(p)]!r} is given twice")
            seen.add(id(p))
            names.append(name_of[id(p)])
        devices = {p.device for p in params}
        if len(devices) > 1:
            raise UnsupportedConfigurationError(
                f"the parameters live on several devices ({sorted(map(str, devices))}); the "
                "operators need them on one device: move the model with model.to(device)"
            )
        for p in params:
            if not p.is_floating_point():
                raise UnsupportedConfigurationError(
                    f"parameter {name_of[id(p)]!r} has dtype {p.dtype}; only real floating "
                    "point parameters are supported"
                )
        self.params = params
        self.names = names
        self.shapes = [p.shape for p in params]
        self.numels = [p.numel() for p in params]
        self.n = sum(self.numels)
        self.device = params[0].device
        if dtype is None:
            dtype = params[0].dtype
            for p in params[1:]:
                dtype = torch.promote_types(dtype, p.dtype)
        if not dtype.is_floating_point or dtype.is_complex:
            raise ValueError(f"dtype must be a real floating point dtype, got {dtype}")
        self.dtype = dtype
        self._primals = tuple(p.detach() for p in params)
        # the process group the gradient and the products are averaged over (None: local)
        self.comm: Communicator | None = (
            Communicator(group, self.device) if group is not None else None
        )

        # Running statistics of normalization layers in train mode: passed as None, so the batch
        # statistics are used (as in training) and nothing is written.
        none_buffers: dict[str, None] = {}
        for mname, mod in model.named_modules():
            if isinstance(mod, _NormBase) and mod.training and mod.track_running_stats:
                for b in _RUNNING_STATS:
                    if getattr(mod, b, None) is not None:
                        none_buffers[f"{mname}.{b}" if mname else b] = None
        self._none_buffers = none_buffers
        # Parameters that are not differentiated but require grad (another optimizer's, or a
        # subset given as params=) and inputs that require grad: passed detached, so the
        # products' graph holds only what the Hessian needs, products come back without a
        # graph, and a gradient with no path to the differentiated parameters has no graph.
        diff = {id(p) for p in params}
        self._frozen = {
            n: p.detach()
            for n, p in model.named_parameters(remove_duplicate=False)
            if id(p) not in diff and p.requires_grad
        }
        self.batches = [
            tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, pair)
            for pair in self.batches
        ]
        self._buffers = {
            n: b for n, b in model.named_buffers() if n not in none_buffers and b is not None
        }
        self._mutable: set[str] = set()  # buffers a forward pass mutates: cloned per call
        # nn.Embedding(padding_idx=p) with a differentiated weight: torch masks row p of the
        # weight's gradient, but its second derivatives do not follow the mask (reverse over
        # reverse gives a symmetric matrix that is neither the loss's Hessian nor the masked
        # gradient's Jacobian). Every evaluation here runs them with padding_idx=None (the
        # forward pass is the same): gradient and products are the loss's own; the update
        # operator applies the step's mask itself. ``padded``: (param index, module name, row);
        # ``padding_reached`` / ``padding_share``: whether the batch looks the row up, and the
        # lookups' share of the row's gradient (what the step drops; set by gradient()).
        #: what the products do not model or do differently, as report notes
        self.notes: list[str] = []
        index_of = {id(p): i for i, p in enumerate(params)}
        self._padded_modules: list[torch.nn.Embedding] = []
        self.padded: list[tuple[int, str, int]] = []
        for mname, mod in model.named_modules():
            if not isinstance(mod, torch.nn.Embedding):
                continue
            if mod.max_norm is not None:
                raise UnsupportedConfigurationError(
                    f"module {mname or type(mod).__name__!r} is an nn.Embedding with "
                    f"max_norm={mod.max_norm}: its forward pass renormalizes rows of the weight "
                    "in place, so evaluating the loss would change your model (and the real "
                    "step is not a function of the optimizer state alone); estimate on a copy "
                    "with max_norm=None, or renormalize outside the forward pass"
                )
            sources = {id(t) for t in _weight_sources(mod)}
            if mod.scale_grad_by_freq and any(id(p) in sources for p in params):
                raise UnsupportedConfigurationError(
                    f"module {mname or type(mod).__name__!r} is an nn.Embedding with "
                    "scale_grad_by_freq=True: torch scales each looked-up row's gradient by "
                    "1 / (its count in the batch), which is not the gradient of any loss, so "
                    "the step's curvature is not symmetric (Lanczos and the adjoint would be "
                    "wrong: 47% asymmetry on a small tagger); estimate on a copy with "
                    "scale_grad_by_freq=False (the step then differs by that per-row scale)"
                )
            if mod.padding_idx is not None and id(mod.weight) not in index_of and any(
                    id(p) in sources for p in params):
                note = (
                    f"module {mname or type(mod).__name__!r}: nn.Embedding(padding_idx="
                    f"{mod.padding_idx}) with a computed weight (a parametrization such as "
                    "weight_norm): the step's mask of the padding row is not modelled, so J "
                    "there is approximate (3.7e-2 off real steps on a small tagger); "
                    "padding_idx=None, or an unparametrized weight, gives the exact J"
                )
                self._say(note, stacklevel=5)
            if mod.padding_idx is None or id(mod.weight) not in index_of:
                continue
            row = int(mod.padding_idx) % mod.num_embeddings  # an attribute set to -1 too
            self._padded_modules.append(mod)
            self.padded.append((index_of[id(mod.weight)], mname, row))
        self._keep_padding = False  # _padding_shares' evaluation: torch's masked backward
        #: padded rows whose lookups the loss reads through a variable of their own
        #: (:meth:`split_padding`): ``(param index, row)``; the products then take ``part=``
        self.split: list[tuple[int, int]] = []
        self._split_hits: list[int] = []
        #: True for an operator kappa_gpu builds for itself with hvp="forward" (estimate's
        #: start helper): a fallback to reverse mode is then not the user's concern
        self.quiet_fallback = False
        #: what the ranks must agree on besides the parameters (set by the operator's builder)
        self.agree_fields: dict[str, Any] = {}
        self.agree_where = "hessian_operator"
        #: rows of F.embedding(..., padding_idx=p) calls made outside nn.Embedding modules on a
        #: differentiated weight (set by gradient()): split too, or approximate (a note)
        self.direct_padding: list[tuple[int, int]] = []
        self.padding_reached = [False] * len(self.padded)
        self.padding_share: list[torch.Tensor] = [
            torch.zeros(m.embedding_dim, dtype=torch.float64, device=self.device)
            for m in self._padded_modules
        ]
        self._modes = [(m, m.training) for m in model.modules()]
        #: more staleness checks, run by check_fresh (the update operator's hyper-parameters)
        self.fresh_checks: list[Callable[[], None]] = []
        self._versions = [p._version for p in params]

        self.n_hvp = 0
        self.hvp_choice = hvp
        # (leaves, grads): the gradient's graph, kept for the products (hvp="auto")
        self._graph: tuple[list[torch.Tensor], Sequence[torch.Tensor | None]] | None = None
        self.mode: str | None = None  # FORWARD_OVER_REVERSE / REVERSE_OVER_REVERSE once known
        self.fallback_reason: str | None = None
        self._vmap_ok: bool | None = None
        # forward mode's checks (_check_forward): the graph searched, a nonzero product seen
        self._graph_searched = False
        self._zero_checked = False
        # forward mode: the local eager gradient, compared once with torch.func's (the same
        # random draw?); what the products see differently, as report notes
        self._eager_grads: list[torch.Tensor | None] | None = None
        self._rng_checked = False
        # why the products cannot be right (a cut in the gradient's graph): raised by every
        # product once found
        self._cut: str | None = None
        self.loss_value: float | None = None
        self.unused: list[bool] = [False] * len(params)

    # -- the loss ------------------------------------------------------------------------
    def _loss(self, ptensors, *, buffers=None, wrap: bool = False,
              lookups: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """The loss at ``ptensors``; with split padding rows (:meth:`split_padding`) their
        lookups read ``lookups`` (default: the rows' values, detached: torch's masked step)."""
        tensors: dict[str, Any] = dict(self._none_buffers)
        tensors.update(self._frozen)
        if buffers is not None:
            tensors.update(buffers)
        else:
            for n in self._mutable:
                tensors[n] = self._buffers[n].clone()
        tensors.update(zip(self.names, ptensors, strict=True))
        if self._keep_padding:
            return self._batches_loss(tensors, wrap)
        if not self.split:
            with self._padding_off():
                return self._batches_loss(tensors, wrap)
        if lookups is None:
            lookups = [ptensors[i][row].detach() for i, row in self.split]
        subs = [(ptensors[i], row, a) for (i, row), a in zip(self.split, lookups, strict=True)]
        with self._padding_off(), _SplitLookups(subs) as mode:
            loss = self._batches_loss(tensors, wrap)
        self._split_hits = mode.hits
        return loss

    def split_padding(self, rows: Sequence[tuple[int, int]]) -> torch.Tensor | None:
        """Read the lookups of the padding ``rows`` (``(param index, row)``) through variables
        of their own (:class:`_SplitLookups`), for rows whose weight is also used elsewhere
        while the padding positions are scored: the step drops only the lookups' share of the
        row's gradient, and its curvature ``G = d(masked gradient)/dtheta`` is not symmetric.
        With ``a`` the lookups' variables and ``P`` the map ``theta -> theta[rows]``, the joint
        Hessian ``Hj`` of ``L(theta, a)`` gives, one product each (``part=`` of :meth:`hvp`):
        ``H v = [Hj (v, P v)]_theta + P^T [Hj (v, P v)]_a`` (``"full"``), ``G v =
        [Hj (v, P v)]_theta`` (``"step"``), ``G^T v = [Hj (v, 0)]_theta + P^T [Hj (v, 0)]_a``
        (``"adjoint"``).

        Rebuilds the kept gradient graph (one more gradient evaluation). Returns the step's
        gradient (torch's masked one at these rows, the loss's own elsewhere), or None where
        this cannot run (forward-mode products, a process group, a lookup not found): the
        engine is then unchanged."""
        if (not rows or self.comm is not None or self.hvp_choice == "forward"
                or self._graph is None or self.mode == FORWARD_OVER_REVERSE):
            return None
        prev, self.split = self.split, list(rows)
        try:
            graph = self._gradient_graph()
            P = len(self.params)
            found = all(h > 0 for h in self._split_hits) and all(
                g is not None for g in graph[1][P:])
            if found and self.mode is None:  # the first product decides the mode: reverse
                v = torch.zeros(self.n, dtype=self.dtype, device=self.device)
                self._reverse(v, graph=graph)
        except Exception as err:
            self._log("padding rows %s not split (%s: %s)", rows, type(err).__name__, err)
            found = False
        if not found:
            self.split = prev  # the kept graph is still prev's
            return None
        self._graph = graph
        self.mode = REVERSE_OVER_REVERSE
        leaves, grads = graph
        return self.flatten([torch.zeros_like(p) if g is None else g.detach()
                             for g, p in zip(grads[:P], leaves[:P], strict=True)])

    def _say(self, note: str, stacklevel: int = 3) -> None:
        """A report note (``notes``, put into estimate's message), also warned."""
        self.notes.append(note)
        warnings.warn(note, UserWarning, stacklevel=stacklevel)

    @contextlib.contextmanager
    def _padding_lookups(self) -> Iterator[list[bool]]:
        """Record which padded rows the forward pass looks up (forward pre-hooks on the padded
        embeddings, removed on exit): the rows the step masks, whatever their gradient (a zero
        padding row reached by the batch has a zero gradient, not a zero curvature)."""
        seen = [False] * len(self.padded)
        handles = []
        for i, (mod, (_, _, row)) in enumerate(zip(self._padded_modules, self.padded,
                                                   strict=True)):
            def pre(m, args, kwargs, i=i, row=row):
                ids = args[0] if args else kwargs.get("input")
                if isinstance(ids, torch.Tensor) and bool((ids == row).any()):
                    seen[i] = True

            handles.append(mod.register_forward_pre_hook(pre, with_kwargs=True))
        try:
            yield seen
        finally:
            for h in handles:
                h.remove()

    def _padding_shares(self, grads: Sequence[torch.Tensor | None]) -> list[torch.Tensor]:
        """The lookups' share of each padded row's gradient: the loss's gradient minus the one
        torch's masked backward gives (one more gradient evaluation, with ``padding_idx`` as
        the model has it): what the step drops. All of the row's gradient unless the weight is
        also used elsewhere (a tied output layer, a weight reused in the forward pass)."""
        leaves = [p.detach().requires_grad_(True) for p in self.params]
        self._keep_padding = True
        try:
            with self._seeded(), torch.enable_grad():
                masked = torch.autograd.grad(self._loss(leaves), leaves, allow_unused=True)
        finally:
            self._keep_padding = False
        shares = []
        for i, _, row in self.padded:
            full = grads[i][row] if grads[i] is not None else 0.0
            kept = masked[i][row] if masked[i] is not None else 0.0
            share = torch.as_tensor(full - kept).to(torch.float64)
            shares.append(share.expand(self.params[i].shape[1]).clone())
        return shares

    @contextlib.contextmanager
    def _padding_off(self) -> Iterator[None]:
        """``padding_idx=None`` on the differentiated embeddings for one evaluation (restored
        on exit, also on an error): the loss's own gradient and Hessian (see ``padded``)."""
        split = set(self.split)
        saved = [(mod, mod.padding_idx) for mod, (i, _, row) in
                 zip(self._padded_modules, self.padded, strict=True) if (i, row) not in split]
        try:
            for mod, _ in saved:
                mod.padding_idx = None
            yield
        finally:
            for mod, idx in saved:
                mod.padding_idx = idx

    def _batches_loss(self, tensors: dict[str, Any], wrap: bool) -> torch.Tensor:
        total = None
        for i, (inputs, targets) in enumerate(self.batches):
            if not wrap:
                out = functional_call(self.model, tensors, (inputs,))
                loss = self.loss_fn(out, targets)
            else:
                where = f"batch {i}" if len(self.batches) > 1 else "the batch"
                try:
                    out = functional_call(self.model, tensors, (inputs,))
                except Exception as err:
                    raise BatchError(
                        f"the model ({type(self.model).__name__}) cannot take {where}: inputs "
                        f"{describe(inputs)}, targets {describe(targets)}; it raised "
                        f"{type(err).__name__}: {err}. Pass batch=(inputs, targets) with inputs "
                        "that model(inputs) accepts, or a list of such pairs"
                    ) from err
                try:
                    loss = self.loss_fn(out, targets)
                except Exception as err:
                    raise BatchError(
                        f"loss_fn(model(inputs), targets) failed on {where}: model output "
                        f"{describe(out)}, targets {describe(targets)}; it raised "
                        f"{type(err).__name__}: {err}. The loss convention is "
                        "loss_fn(model(inputs), targets) for batch=(inputs, targets)"
                    ) from err
                if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                    raise BatchError(
                        f"loss_fn returned {describe(loss)} on {where}; it must return a scalar "
                        "tensor (e.g. reduction='mean')"
                    )
                loss = loss.reshape(())
            total = loss if total is None else total + loss
        assert total is not None
        return total / len(self.batches) if len(self.batches) > 1 else total

    @contextlib.contextmanager
    def _seeded(self) -> Iterator[None]:
        """Fork the global RNG and seed it with the operator's seed (restored on exit); autocast
        off (the products are in the model's dtype inside a mixed-precision region too)."""
        dev = self.device
        if dev.type == "cpu":
            with torch.random.fork_rng(devices=[]), autocast_off():
                torch.default_generator.manual_seed(self.seed)
                yield
            return
        mod = torch.get_device_module(dev.type)
        idx = dev.index if dev.index is not None else mod.current_device()
        with torch.random.fork_rng(devices=[idx], device_type=dev.type), autocast_off():
            torch.default_generator.manual_seed(self.seed)
            with mod.device(idx):
                mod.manual_seed(self.seed)
            yield

    def check_fresh(self) -> None:
        """Raise :class:`StaleOperatorError` if the parameters or a module's mode changed."""
        for p, v, name in zip(self.params, self._versions, self.names, strict=True):
            if p._version != v:
                raise StaleOperatorError(
                    f"parameter {name!r} changed since the operator was built (an optimizer "
                    "step or an in-place edit); the operator describes the old point: build a "
                    "new one"
                )
        for m, training in self._modes:
            if m.training != training:
                raise StaleOperatorError(
                    f"a module ({type(m).__name__}) switched to "
                    f"{'train' if m.training else 'eval'} mode since the operator was built; "
                    "switch it back or build a new operator"
                )
        for check in self.fresh_checks:
            check()

    def _log(self, msg: str, *args: Any) -> None:
        """Log at INFO on the ``kappa_gpu`` logger (on the group's first rank only)."""
        if self.comm is None or self.comm.rank == 0:
            logger.info(msg, *args)

    # -- gradient at build time (validates the batch and the point) ----------------------
    def gradient(self) -> torch.Tensor:
        """Loss and gradient at the current point, flattened in the engine's dtype.

        Plain reverse mode (what ``loss.backward()`` does), with error messages that name the
        batch. Also finds the buffers a forward pass mutates, and the parameters the loss does
        not reach (``unused``: their autograd gradient is None, so ``optimizer.step()`` after
        ``zero_grad()`` skips them).

        Under a process group the loss and the gradient are averaged over the ranks (a
        parameter is unused only if it is unused on every rank), after the ranks have agreed
        that none failed and that they hold the same parameters; every rank then runs the same
        checks on the same numbers, so they raise (or not) together.
        """
        err: Exception | None = None
        local = None
        if self.comm is not None:  # before the variable-sized exchanges below
            agree_arguments(self.comm, dict(
                numels=tuple(self.numels), dtype=self.dtype, hvp=self.hvp_choice,
                **self.agree_fields,
            ), self.agree_where)
        try:
            local = self._local_gradient()
        except Exception as exc:
            if self.comm is None:
                raise
            err = exc
        if self.comm is None:
            assert local is not None
            loss, requires_grad, grads = local
            note = ""
            used = [g is not None for g in grads] if grads is not None else None
            flat = None
            if grads is not None:
                flat = self.flatten(
                    [
                        torch.zeros_like(p) if g is None else g
                        for g, p in zip(grads, self._primals, strict=True)
                    ]
                )
        else:
            loss, requires_grad, flat, used, note = self._average_gradient(err, local)
            if self.padded:  # a row any rank looks up is masked on every rank; shares averaged
                flags = torch.tensor(self.padding_reached, dtype=torch.float64,
                                     device=self.device)
                self.padding_reached = (self.comm.average_(flags) > 0).tolist()
                self.padding_share = list(self.comm.average_(torch.cat(
                    self.padding_share)).split([t.numel() for t in self.padding_share]))
        if not torch.isfinite(loss).all():
            raise NonFiniteError(
                f"the loss is {loss.item()} at the current point{note}; the linearized update "
                "is undefined there. Check the batch and the model (has training diverged?), or "
                "analyse an earlier checkpoint"
            )
        self.loss_value = float(loss.item())
        if not requires_grad:
            raise NoTrainableParametersError(
                "the loss does not depend on any of the differentiated parameters; check that "
                "the optimizer holds the parameters model(inputs) uses"
            )
        assert flat is not None and used is not None
        self.unused = [not u for u in used]
        o = 0
        # One device sync: a finite sum proves every entry finite (no n-entry mask); find
        # the culprit if not.
        finite = math.isfinite(float(flat.detach().sum())) or bool(torch.isfinite(flat).all())
        for k, name in zip(self.numels, self.names, strict=True):
            if not finite and not torch.isfinite(flat[o : o + k]).all():
                raise NonFiniteError(
                    f"the gradient of the loss is not finite in parameter {name!r} at the "
                    f"current point (loss = {self.loss_value:.6g}){note}; the linearized update "
                    "is undefined there. Check the model/loss for singular operations (sqrt/log "
                    "at 0, division by 0) or analyse an earlier checkpoint"
                )
            o += k
        if self.direct_padding and not self.split:
            names = ", ".join(f"{self.names[i]}[{row}]" for i, row in self.direct_padding)
            step = self.split_padding(self.direct_padding)
            if step is not None:
                flat = step  # torch's masked gradient there (the one the graph had)
            else:
                note = (
                    f"F.embedding(..., padding_idx=...) is called on {names} outside an "
                    "nn.Embedding module: torch's second derivatives through padding_idx follow "
                    "neither the loss nor the masked gradient, and the lookups are split off "
                    "only with reverse-mode products on one process (hvp='auto', no process "
                    "group), so the products there are approximate; use nn.Embedding("
                    "padding_idx=...) or hvp='auto' on one process"
                )
                self._say(note, stacklevel=4)
        return flat

    def _local_gradient(
        self,
    ) -> tuple[torch.Tensor, bool, list[torch.Tensor | None] | None]:
        """This process's ``(loss, loss.requires_grad, grads)``; ``grads`` is None when the
        loss is not finite or reaches no parameter (the caller raises)."""
        leaves = [p.detach().requires_grad_(True) for p in self.params]
        clones = {n: b.detach().clone() for n, b in self._buffers.items()}
        v0 = {n: c._version for n, c in clones.items()}
        with (self._seeded(), torch.enable_grad(), self._padding_lookups() as seen,
              _DirectPadding(leaves) as direct):
            loss = self._loss(leaves, buffers=clones, wrap=True)
        self.padding_reached = seen
        self.direct_padding = sorted(direct.rows)
        out = self._local_gradient_of(loss, leaves, clones, v0)
        if any(seen) and out[2] is not None:
            self.padding_share = self._padding_shares(out[2])
        return out

    def _local_gradient_of(self, loss, leaves, clones, v0):
        """:meth:`_local_gradient` after the forward pass."""
        self._mutable = {n for n, c in clones.items() if c._version != v0[n]}
        if self._mutable:
            self._log("buffers mutated by the forward pass, cloned per call: %s", self._mutable)
        if not torch.isfinite(loss).all() or not loss.requires_grad:
            return loss.detach(), bool(loss.requires_grad), None
        if self.hvp_choice == "forward":
            grads = torch.autograd.grad(loss, leaves, allow_unused=True)
            self._eager_grads = list(grads)
            return loss.detach(), True, list(grads)
        # The products' graph, built with the gradient the build needs anyway (module docs).
        with torch.enable_grad():
            grads = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
        self._graph = (leaves, grads)
        self._graph_searched = True
        if _cut_nodes(grads):
            self._cut = _PARTIAL_CUT  # raised by every product (_local_hvp)
        self._eager_grads = [None if g is None else g.detach() for g in grads]
        return loss.detach(), True, self._eager_grads

    def _average_gradient(
        self,
        err: Exception | None,
        local: tuple[torch.Tensor, bool, list[torch.Tensor | None] | None] | None,
    ) -> tuple[torch.Tensor, bool, torch.Tensor | None, list[bool] | None, str]:
        """Collective: agree on failures, check the parameters match, average loss and grad.

        Returns ``(mean loss, requires_grad, averaged flat gradient or None, used mask or
        None, note for messages)``; every rank gets the same values, so the checks that
        follow raise on all ranks or on none. Costs one all-gather of ``len(params) + 5``
        numbers per rank and one all-reduce of the ``n``-vector gradient.
        """
        comm = self.comm
        assert comm is not None
        P = len(self.params)
        grads = None
        if err is None:
            assert local is not None
            loss, requires_grad, grads = local
            used = [0.0] * P if grads is None else [float(g is not None) for g in grads]
            row = [float(loss), float(requires_grad), *used, *checksum(self._primals)]
        else:
            row = [0.0] * (P + 4)
        table = comm.exchange(err, "while computing the loss and the gradient", row)
        comm.check_identical(
            table[:, -2:],
            "the parameters",
            "DDP keeps them equal; was the optimizer stepped on some ranks only, or the model "
            "changed on one rank?",
        )
        losses = table[:, 0].tolist()
        bad = [comm.global_rank(i) for i, x in enumerate(losses) if not math.isfinite(x)]
        note = f" (mean over {comm.world_size} ranks"
        note += f"; not finite on ranks {bad})" if bad else ")"
        mean = torch.tensor(sum(losses) / len(losses), dtype=torch.float64)
        requires_grad_all = bool((table[:, 1] != 0).all())
        if bad or not requires_grad_all:
            return mean, requires_grad_all, None, None, note  # every rank raises the same
        assert grads is not None
        flat = self.flatten(
            [
                torch.zeros_like(p) if g is None else g
                for g, p in zip(grads, self._primals, strict=True)
            ]
        )
        comm.average_(flat)
        used_any = (table[:, 2 : 2 + P] != 0).any(dim=0).tolist()
        return mean, True, flat, used_any, note

    # -- flatten / unflatten -------------------------------------------------------------
    def unflatten(self, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``(n,)`` -> per-parameter views (``(s, n)`` -> ``(s, *shape)``) in the params' dtypes."""
        out, o = [], 0
        lead = v.shape[:-1]
        for p, k, shape in zip(self._primals, self.numels, self.shapes, strict=True):
            out.append(v[..., o : o + k].reshape(*lead, *shape).to(p.dtype))
            o += k
        return tuple(out)

    def flatten(self, ts: Sequence[torch.Tensor], batched: bool = False) -> torch.Tensor:
        """Inverse of :meth:`unflatten`; the result is in the engine's dtype."""
        if batched:
            return torch.cat([t.reshape(t.shape[0], -1).to(self.dtype) for t in ts], dim=1)
        return torch.cat([t.reshape(-1).to(self.dtype) for t in ts])

    # -- products --------------------------------------------------------------------------
    @without_autocast
    def hvp(self, V: torch.Tensor, part: str = "full") -> torch.Tensor:
        """``H @ V`` for ``V`` of shape ``(n,)`` or ``(n, s)``; costs one HVP per column.
        ``part``: ``"step"`` / ``"adjoint"`` give ``G V`` / ``G^T V`` of split padding rows
        (:meth:`split_padding`; ``H V`` when none are split).

        Under a process group: the mean over the ranks of their local products (a collective:
        every rank must call it with the same ``V``). The ranks first exchange a failure flag
        and a checksum of ``V``; if one failed or the ``V`` differ, all raise together.
        """
        if self.comm is None:
            return self._local_hvp(V, part)
        err: Exception | None = None
        out = None
        try:
            out = self._local_hvp(V, part)
        except Exception as exc:
            err = exc
        sums = self.comm.exchange(err, "in a Hessian-vector product", checksum(V))
        self.comm.check_identical(
            sums,
            "the vectors the Hessian is applied to",
            "Every rank must run the same solver on the same start vectors: pass the same "
            "warm_start on every rank (the reports of earlier distributed estimates are), and the "
            "same dtype, k, tol and solver settings",
        )
        assert out is not None
        if out.numel() == 0:
            return out
        if out.ndim == 2 and not out.is_contiguous() and out.T.is_contiguous():
            self.comm.average_(out.T)  # a view of rows (the input's layout): averaged in place
            return out
        return self.comm.average_(out.contiguous())

    def _local_hvp(self, V: torch.Tensor, part: str = "full") -> torch.Tensor:
        """This process's ``H @ V`` (its own loss and batch)."""
        self.check_fresh()
        if self._cut is not None:
            raise _CutGraphError(self._cut)
        s = 1 if V.ndim == 1 else V.shape[1]
        if s == 0:
            return torch.zeros_like(V)
        if self.split:  # split_padding set reverse mode and keeps its graph
            out = self._reverse(V, part)
        elif self.mode == REVERSE_OVER_REVERSE:
            out = self._reverse(V)
        elif self.mode == FORWARD_OVER_REVERSE:
            out = self._forward(V)
        else:  # the first product: the preferred path, the other one if it cannot run here
            paths = [(REVERSE_OVER_REVERSE, self._reverse), (FORWARD_OVER_REVERSE, self._forward)]
            if self.hvp_choice == "forward":
                paths.reverse()
            (mode, first), (other, second) = paths
            try:
                out = first(V)
            except _CutGraphError:
                raise  # a property of the model: forward mode would not see through it either
            except Exception as err:
                self.fallback_reason = f"{type(err).__name__}: {err}"
                self._log("%s HVP failed (%s); using %s", mode, self.fallback_reason, other)
                self._graph = None  # not used by the fallback: free it
                try:
                    out = second(V)
                except _CutGraphError:
                    raise
                except Exception as err2:
                    raise _no_hvp_error(mode, self.fallback_reason, other, err2) from err2
                self.mode = other
                if self.hvp_choice == "forward" and not self.quiet_fallback:  # asked for
                    note = (
                        f"hvp='forward' was asked for, but forward mode failed here "
                        f"({self.fallback_reason}; e.g. F.mse_loss's mean has no forward-mode "
                        "rule in torch 2.13): the products use reverse-over-reverse instead, "
                        "rebuilding the gradient's graph for each product (nothing is kept)"
                    )
                    self._say(note, stacklevel=5)
            else:
                self.mode = mode
        if self.mode == FORWARD_OVER_REVERSE and not self._zero_checked:
            self._check_forward(V, out)
        if self.mode == FORWARD_OVER_REVERSE and not self._rng_checked:
            self._check_randomness()
        self.n_hvp += s
        return out

    def _check_randomness(self) -> None:
        """Once, at the first forward-mode product: does torch.func's evaluation of the loss
        draw what the eager gradient drew? Under torch.func, dropout on a non-contiguous tensor
        (inside ``nn.MultiheadAttention``, ``TransformerEncoderLayer(batch_first=True)``) draws
        its mask in another element order (torch 2.13), so the products would see another mask
        than the gradient the operator was built with. Costs one gradient evaluation."""
        self._rng_checked = True
        eager = self._eager_grads
        self._eager_grads = None
        if eager is None:
            return
        with self._seeded(), torch.enable_grad():
            func = grad(self._loss)(self._primals)
        num = den = 0.0
        for e, f in zip(eager, func, strict=True):
            e = torch.zeros_like(f) if e is None else e
            num += float(torch.sum((e.double() - f.double()) ** 2))
            den += float(torch.sum(e.double() ** 2))
        rel = math.sqrt(num / den) if den > 0 else math.sqrt(num)
        if rel <= math.sqrt(float(torch.finfo(self.dtype).eps)):
            return
        note = (
            "forward-mode products (hvp='forward', or the fallback where double backward is "
            "missing) see another random draw than the gradient the operator was built with "
            f"(they differ by {rel:.1e}): under torch.func, dropout on a non-contiguous tensor "
            "(e.g. inside nn.MultiheadAttention or TransformerEncoderLayer(batch_first=True)) "
            "draws its mask in another element order. The products are exact for one fixed "
            "mask, but Adam's preconditioner saw another. For one consistent mask use "
            "hvp='auto' (reverse mode, the default) or put the dropout modules in eval mode"
        )
        self._say(note, stacklevel=5)

    def _check_forward(self, V: torch.Tensor, out: torch.Tensor) -> None:
        """Forward mode reads through a backward computed outside autograd (a custom Function
        whose backward is ``once_differentiable``) as 0, silently. So at the first forward-mode
        product the gradient's graph is built once (not kept) and searched for such a backward
        (:func:`_cut_nodes`), and the first product of a nonzero ``V``, if exactly 0, is checked
        by double backward, which tells a cut from a loss that is linear in the parameters (its
        gradient has no graph: the zero is right). A cut is remembered: every later product
        raises too. Costs one gradient with its graph, once per operator (a transient peak of
        about a training step's memory)."""
        if not self._graph_searched:
            self._graph_searched = True
            try:
                self._gradient_graph()
            except _CutGraphError as err:
                self._cut = str(err)
                raise
            except Exception as err:  # no graph to search (e.g. no create_graph through it)
                self._log("the gradient's graph could not be built to check the forward-mode "
                          "HVP (%s: %s)", type(err).__name__, err)
        if not bool((V != 0).any()):
            return  # a zero vector tells nothing: check the next product
        self._zero_checked = True
        if not bool((out == 0).all()):
            return
        try:
            self._reverse(V)
        except _CutGraphError as err:
            self._cut = (
                f"a forward-mode Hessian-vector product came out exactly 0, and double backward "
                f"shows why: {err}. Forward mode reads through such a backward as 0 too."
            )
            raise _CutGraphError(self._cut) from None
        except Exception as err:  # no double backward here either: nothing to compare with
            self._log("a forward-mode HVP is exactly 0 and could not be checked by double "
                      "backward (%s: %s)", type(err).__name__, err)
        finally:
            self._graph = None  # forward mode keeps no graph

    def _hvp_tuple(self, tangents: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        return jvp(grad(self._loss), (self._primals,), (tangents,))[1]

    @staticmethod
    def _load_jvp_decompositions() -> None:
        # torch loads its forward-mode decompositions on first use through torch.jit.script,
        # which warns (DeprecationWarning) in torch >= 2.10: load them quietly, once, so the
        # warning neither reaches users nor, under -W error, fails the first forward-mode HVP.
        load = getattr(torch.autograd.forward_ad, "_maybe_load_decompositions", None)
        if load is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                try:
                    load()
                except Exception:  # pragma: no cover - private torch API; harmless to skip
                    pass

    def _forward(self, V: torch.Tensor) -> torch.Tensor:
        if self.mode is None:
            self._load_jvp_decompositions()
        if V.ndim == 1:
            with self._seeded(), torch.enable_grad():
                return self.flatten(self._hvp_tuple(self.unflatten(V)))
        s = V.shape[1]
        if s == 1 or self._vmap_ok is False:
            return torch.stack([self._forward(V[:, j]) for j in range(s)], dim=1)
        tangents = self.unflatten(V.T.contiguous())
        try:
            with self._seeded(), torch.enable_grad():
                out = vmap(self._hvp_tuple, randomness="same")(tangents)
        except Exception as err:
            if self._vmap_ok:
                raise
            first = self._forward(V[:, 0])  # raises if forward mode itself is the problem
            self._vmap_ok = False
            self._log(
                "vmap over HVP columns failed (%s: %s); applying columns one by one",
                type(err).__name__,
                err,
            )
            rest = [self._forward(V[:, j]) for j in range(1, s)]
            return torch.stack([first, *rest], dim=1)
        self._vmap_ok = True
        return self.flatten(out, batched=True).T.contiguous()

    def _gradient_graph(self) -> tuple[list[torch.Tensor], Sequence[torch.Tensor | None]]:
        """(leaves, gradients with their graph) at the current point; raises
        :class:`_CutGraphError` if the graph runs through a ``once_differentiable`` backward
        (:func:`_cut_nodes`), whose second derivatives would be dropped silently."""
        leaves = [p.detach().requires_grad_(True) for p in self.params]
        # split padding rows: the lookups' variables, leaves after the parameters
        extra = [leaves[i][row].detach().clone().requires_grad_(True) for i, row in self.split]
        with self._seeded(), torch.enable_grad():
            loss = self._loss(leaves, lookups=extra or None)
            grads = torch.autograd.grad(loss, leaves + extra, create_graph=True,
                                        allow_unused=True)
        if _cut_nodes(grads):
            raise _CutGraphError(_PARTIAL_CUT)
        return leaves + extra, grads

    def _reverse(self, V: torch.Tensor, part: str = "full", graph=None) -> torch.Tensor:
        # columns as contiguous rows: one transposing copy instead of a strided gather per column
        cols = [V] if V.ndim == 1 else list(V.T.contiguous())
        cached = self.hvp_choice != "forward"
        if graph is None:
            graph = self._graph
        if graph is None:
            graph = self._gradient_graph()
            if cached:
                self._graph = graph

        leaves, grads = graph
        P = len(self.params)  # leaves after P: split padding rows' lookups (split_padding)
        # gradient entries without a graph (linear in the params) have zero Hessian rows
        live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad
                and (i < P or part != "adjoint")]
        # (s, n) rows written in place, one transposing copy at the end (a stack into columns
        # is a strided write of s n entries, 3x slower on a CPU), none for a transposed input
        out = None if V.ndim == 1 else torch.empty(len(cols), self.n, dtype=self.dtype,
                                                   device=V.device)
        for j, col in enumerate(cols):
            tang = self.unflatten(col)
            if len(leaves) > P:  # (v, P v): the lookups move with their rows
                tang = (*tang, *(tang[i][row] for i, row in self.split))
            hv: Sequence[torch.Tensor | None] = [None] * len(leaves)
            if live:
                hv = torch.autograd.grad(
                    [grads[i] for i in live],
                    leaves,
                    grad_outputs=[tang[i] for i in live],
                    retain_graph=cached or j < len(cols) - 1,
                    allow_unused=True,
                )
                if all(h is None for h in hv):
                    # The gradient depends on the parameters (it has a graph) but the second
                    # backward pass reaches none of them: a backward computed outside autograd
                    # (a custom autograd.Function marked once_differentiable, or one that
                    # detaches). The Hessian would silently read 0.
                    raise _CutGraphError(
                        "the gradient's graph does not lead back to any parameter: a custom "
                        "autograd.Function in the model or the loss computes its backward "
                        "outside autograd (once_differentiable, or a detach), so second "
                        "derivatives through it are not available and Hessian-vector products "
                        "would read 0; give the Function a differentiable backward (torch "
                        "operations on saved tensors) and a jvp"
                    )
            parts = [torch.zeros_like(p) if h is None else h
                     for h, p in zip(hv[:P], leaves[:P], strict=True)]
            if part != "step":  # fold the lookups' rows back: + P^T [.]_a
                for (i, row), h in zip(self.split, hv[P:], strict=True):
                    if h is not None:
                        parts[i] = parts[i].clone()
                        parts[i][row] += h
            if out is None:
                return self.flatten(parts)
            torch.cat([t.reshape(-1).to(self.dtype) for t in parts], out=out[j])
        assert out is not None
        # The layout follows the input's, as torch's elementwise operations do: a transposed
        # view of rows (the solvers' certificate blocks) gets one back, anything else a
        # contiguous (n, s) tensor.
        return out.T if V.T.is_contiguous() and not V.is_contiguous() else out.T.contiguous()


def _no_hvp_error(mode: str, reason: str, other: str, err2: Exception) -> Exception:
    """Both HVP modes failed: one error naming both causes (the fallback's alone hid the first),
    with the fix for the common case, fused attention kernels without second derivatives."""
    both = f"{reason} {err2}"
    hint = ""
    if "scaled_dot_product" in both or "_efficient_attention" in both:
        hint = (
            "; the fused scaled_dot_product_attention kernels have no double backward / forward "
            "AD here: run under the math kernel, `from torch.nn.attention import sdpa_kernel, "
            "SDPBackend` and `with sdpa_kernel(SDPBackend.MATH): kg.estimate(...)`"
        )
    return UnsupportedConfigurationError(
        f"no Hessian-vector product for this model and loss: {mode} failed ({reason}), and "
        f"{other} failed ({type(err2).__name__}: {err2}){hint}"
    )


class _EngineAttributes:
    """Attributes every operator built on an :class:`_HVPEngine` (``self._engine``) exposes."""

    _engine: _HVPEngine

    @property
    def n_hvp(self) -> int:
        return self._engine.n_hvp

    @property
    def hvp_mode(self) -> str | None:
        return self._engine.mode

    @property
    def params(self) -> list[torch.Tensor]:
        return list(self._engine.params)

    @property
    def loss(self) -> float | None:
        return self._engine.loss_value

    @property
    def world_size(self) -> int:
        """Ranks the products are averaged over (1: no communication)."""
        comm = self._engine.comm
        return 1 if comm is None else comm.world_size


class HessianOperator(_EngineAttributes, LinearOperator):
    """The symmetric ``n x n`` operator ``sign * H + diag(shift)`` of a model's loss.

    ``H`` is the Hessian of the loss with respect to the differentiated parameters, flattened in
    order (``.reshape(-1)`` each). :func:`hessian_operator` returns it with ``sign = 1`` and no
    shift; the update operators' :class:`BlockStructure` holds ``Ht = (+-)H + diag(wd)``.

    Costs one Hessian-vector product per column (``matvec``: 1, ``matmat`` with ``s`` columns:
    ``s``, batched with ``vmap``); ``rmatvec`` is ``matvec`` (the operator is symmetric).
    See the module docstring for the HVP modes, randomness and normalization layers. The layout
    of a ``matmat`` product follows its input's, as torch's elementwise operations do: a
    contiguous ``(n, s)`` block gets a contiguous product, the ``(n, s)`` transposed view of
    ``s`` contiguous rows (what the solvers pass) gets such a view back (reverse mode).

    Attributes:
        n_hvp: HVP columns applied so far by every operator sharing this engine.
        world_size: ranks of the process group the products are averaged over (1: local).
        hvp_mode: ``"forward-over-reverse"``, ``"reverse-over-reverse"``, or None before the
            first product.
        params: the differentiated parameters, in order.
        loss: the loss at the current point (float).
        sign: +1, or -1 for ``maximize=True`` optimizers.
        shift: None, a float, or an ``(n,)`` tensor added on the diagonal.
    """


    def __init__(
        self, engine: _HVPEngine, sign: float = 1.0, shift: float | torch.Tensor | None = None
    ):
        super().__init__((engine.n, engine.n), engine.dtype, engine.device)
        self._engine = engine
        # strided blocks are fine for this class's products (the engine applies a block row by
        # row, layout in -> layout out), not for a subclass's own _matmat
        self._strided_ok = type(self)._matmat is HessianOperator._matmat
        self.sign = float(sign)
        if isinstance(shift, torch.Tensor):
            shift = shift.to(device=engine.device, dtype=engine.dtype)
        elif shift is not None and float(shift) == 0.0:
            shift = None
        self.shift = shift


    def _matvec(self, x: torch.Tensor) -> torch.Tensor:
        return self._signed(self._engine.hvp(x), x)

    def _signed(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``sign h + shift x``, in place in ``h`` (a fresh product)."""
        if self.sign != 1.0:
            h = h.mul_(self.sign)
        if self.shift is not None:
            shift = self.shift
            if isinstance(shift, torch.Tensor) and x.ndim == 2:
                shift = shift[:, None]
            h = h.add_(shift * x)
        return h

    _rmatvec = _matvec
    _matmat = _matvec
    _rmatmat = _matvec


def hessian_operator(
    model: torch.nn.Module,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    batch: Any,
    *,
    params: Sequence[torch.Tensor] | None = None,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    process_group: Any = None,
    hvp: str = "auto",
) -> HessianOperator:
    """The Hessian of ``loss_fn(model(inputs), targets)`` as a symmetric ``n x n`` operator.

    Args:
        model: the model, in the train/eval mode the training step uses.
        loss_fn: called as ``loss_fn(model(inputs), targets)``; must return a scalar.
        batch: ``(inputs, targets)``, or a list of such pairs (the loss is then their mean).
        params: the parameters to differentiate, in the order of the flattened vector (e.g. an
            optimizer's). Default: ``[p for p in model.parameters() if p.requires_grad]``.
        seed: seeds the RNG in every product (dropout sees one fixed mask).
        dtype: dtype of the vectors (default: the parameters' dtype). Products are computed
            in the parameters' dtype and cast.
        process_group: the ``torch.distributed`` process group to average the products over.
            Default: the group of a ``DistributedDataParallel`` model, else none (see
            :mod:`kappa_gpu._distributed`). Under a group, building and applying the operator
            are collectives: call them on every rank of the group, in the same order.
        hvp: ``"auto"`` (default: reverse mode through the gradient's graph, kept with the
            operator; forward mode where there is no double backward) or ``"forward"``
            (``jvp`` of ``grad``, nothing kept between products); see the module docs.

    Returns:
        A :class:`HessianOperator`. Building it costs one gradient evaluation (it checks that
        the batch fits the model and that loss and gradient are finite); each product costs one
        HVP per column.

    Raises:
        NoTrainableParametersError, ParameterMismatchError, BatchError, NonFiniteError;
        UnsupportedConfigurationError for FSDP/FSDP2/DTensor-sharded models; DistributedError
        when the ranks of the group disagree (or another rank failed).

    Example:
        >>> H = hessian_operator(model, torch.nn.functional.cross_entropy, (x, y))  # doctest: +SKIP
        >>> H.matvec(torch.randn(H.shape[1]))  # doctest: +SKIP
    """
    if params is None:
        params = [p for p in model.parameters() if p.requires_grad]
    engine = _HVPEngine(
        model, loss_fn, batch, params, seed=seed, dtype=dtype, process_group=process_group,
        hvp=hvp,
    )
    engine.gradient()
    return HessianOperator(engine)
