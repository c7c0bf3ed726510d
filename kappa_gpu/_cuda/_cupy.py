"""Lazy CuPy loader and launcher of the fused update-block kernels (``kernels/*.cu``).

CuPy is optional (``pip install 'kappa-gpu[cuda]'``) and imported on first use only.

Where the CUDA sources are found (first hit wins; each candidate must hold every file of
:data:`KERNEL_FILES`):

1. the folder named by the environment variable ``KAPPA_GPU_KERNEL_DIR``;
2. package data ``kappa_gpu/kernels/`` of an installed wheel (``importlib.resources``);
3. ``<repo>/kernels/`` of a source checkout or an editable install (next to the package).

The sources are read as text and their local ``#include "..."`` lines inlined, so NVRTC gets one
self-contained string and no include path (this also works from a zipped install).

Compilation: one ``cupy.RawModule`` per (device, state dtype, coefficient dtype), compiled by
NVRTC on first use with the kernels of all passes instantiated through name expressions, kept
in memory for the process; CuPy also caches the binary on disk (``~/.cupy/kernel_cache``), so a
new process pays for loading only. ``KAPPA_GPU_NVRTC_OPTIONS`` adds NVRTC options (tuning, e.g.
``-DKG_ILP=2``).

Launch: zero-copy on torch tensors: the kernel receives each tensor's device pointer
(``Tensor.data_ptr()``, the memory the DLPack and ``__cuda_array_interface__`` protocols would
expose) and its strides as plain arguments, with no CuPy array created per call. It runs on the
current torch stream of the tensors' device (``torch.cuda.current_stream(device)``, wrapped as
an external CuPy stream), so it is ordered with the torch work around it without any sync.
"""

from __future__ import annotations

import functools
import importlib
import importlib.resources
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kappa_gpu._cuda._reference import KINDS, PASSES

__all__ = [
    "KERNEL_FILES",
    "BLOCK",
    "ILP",
    "CupyStatus",
    "status",
    "mark_broken",
    "kernel_dir",
    "module_source",
    "name_expressions",
    "LaunchPlan",
    "plan_launch",
    "launch",
]

#: The CUDA sources, in inclusion order (the last one is the module's main file).
KERNEL_FILES = ("kg_common.cuh", "update_blocks.cu")
#: Default threads per block and entries per thread per trip (see :func:`nvrtc_options`).
BLOCK = 256
ILP = 4

#: The C++ name of each pass's Op struct.
OP_NAMES = {
    (kind, direction): "kg::"
    + {"order1": "Order1", "order2": "Order2", "adam_full": "AdamFull"}[kind]
    + {"fwd": "Fwd", "pre": "Pre", "post": "Post"}[direction]
    for kind in KINDS
    for direction in PASSES
}
#: The C++ storage type of each supported torch dtype.
TYPE_NAMES = {torch.float32: "float", torch.float64: "double", torch.bfloat16: "kg::bf16"}

_LOCK = threading.RLock()


# -- availability ----------------------------------------------------------------------------
@dataclass(frozen=True)
class CupyStatus:
    """Whether the CuPy backend can run here, and why not.

    Attributes:
        usable: CuPy imports, sees a CUDA device, and nothing failed since.
        installed: CuPy is importable (False: a normal CPU-only install, nothing to warn about).
        reason: a sentence for logs and warnings.
    """

    usable: bool
    installed: bool
    reason: str


_STATUS: CupyStatus | None = None


def _import_cupy():
    return importlib.import_module("cupy")


def status(refresh: bool = False) -> CupyStatus:
    """Probe CuPy once per process (import it, count CUDA devices) and remember the answer.

    Costs the CuPy import (about a second) on the first call; free afterwards. Never raises.
    """
    global _STATUS
    with _LOCK:
        if _STATUS is not None and not refresh:
            return _STATUS
        try:
            cp = _import_cupy()
        except ImportError as err:
            _STATUS = CupyStatus(
                False, False, f"CuPy is not installed ({err}); pip install 'kappa-gpu[cuda]'"
            )
            return _STATUS
        except Exception as err:  # a broken install raises anything
            _STATUS = CupyStatus(False, True, f"importing CuPy failed: {type(err).__name__}: {err}")
            return _STATUS
        version = getattr(cp, "__version__", "?")
        try:
            ndev = int(cp.cuda.runtime.getDeviceCount())
        except Exception as err:
            _STATUS = CupyStatus(
                False, True, f"CuPy {version} cannot use CUDA: {type(err).__name__}: {err}"
            )
            return _STATUS
        if ndev < 1:
            _STATUS = CupyStatus(False, True, f"CuPy {version} sees no CUDA device")
            return _STATUS
        _STATUS = CupyStatus(True, True, f"CuPy {version}, {ndev} CUDA device(s)")
        return _STATUS


def mark_broken(reason: str) -> CupyStatus:
    """Record that CuPy failed (e.g. NVRTC could not compile) so that ``auto`` stops trying."""
    global _STATUS
    with _LOCK:
        _STATUS = CupyStatus(False, True, reason)
        return _STATUS


# -- sources ---------------------------------------------------------------------------------
def _candidates():
    env = os.environ.get("KAPPA_GPU_KERNEL_DIR")
    if env:
        yield f"$KAPPA_GPU_KERNEL_DIR={env}", Path(env)
    try:
        yield "package data kappa_gpu/kernels", importlib.resources.files("kappa_gpu") / "kernels"
    except (ModuleNotFoundError, TypeError):  # pragma: no cover - namespace oddities
        pass
    yield "source checkout <repo>/kernels", Path(__file__).resolve().parents[2] / "kernels"


def kernel_dir():
    """The folder holding the CUDA sources (a ``Path`` or an ``importlib`` ``Traversable``).

    Raises:
        FileNotFoundError: no candidate holds every file of :data:`KERNEL_FILES`; the message
            lists where it looked.
    """
    tried = []
    for label, d in _candidates():
        try:
            if all(d.joinpath(f).is_file() for f in KERNEL_FILES):
                return d
        except OSError:
            pass
        tried.append(f"{label} ({d})")
    raise FileNotFoundError(
        "the CUDA sources of kappa_gpu (" + ", ".join(KERNEL_FILES) + ") were not found; looked "
        "in: " + "; ".join(tried) + ". Reinstall kappa-gpu, or point KAPPA_GPU_KERNEL_DIR at a "
        "folder holding them"
    )


_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$', re.MULTILINE)


_SOURCES: dict[str, str] = {}


def _source_at(d: Any) -> str:
    key = str(d)
    if key in _SOURCES:
        return _SOURCES[key]
    done: set[str] = set()

    def inline(name: str) -> str:
        if name in done:
            return ""
        done.add(name)
        text = d.joinpath(name).read_text(encoding="utf-8")
        return _INCLUDE.sub(lambda m: inline(m.group(1)), text)

    _SOURCES[key] = inline(KERNEL_FILES[-1])
    return _SOURCES[key]


def module_source() -> str:
    """The CUDA source handed to NVRTC: ``update_blocks.cu`` with its local includes inlined."""
    return _source_at(kernel_dir())


def name_expressions(tdtype: torch.dtype, cdtype: torch.dtype) -> list[str]:
    """The kernel names of one module: every pass, flat and strided, for one dtype pair."""
    t, c = TYPE_NAMES[tdtype], TYPE_NAMES[cdtype]
    return [
        f"kg_block<{op}, {t}, {c}, {flat}>"
        for op in OP_NAMES.values()
        for flat in ("true", "false")
    ]


def nvrtc_options() -> tuple[str, ...]:
    """NVRTC options of the module: ``KAPPA_GPU_NVRTC_OPTIONS`` (e.g. ``-DKG_ILP=2
    -DKG_BLOCK=128``, for tuning) overrides the defaults ``-DKG_BLOCK=256 -DKG_ILP=4``."""
    extra = os.environ.get("KAPPA_GPU_NVRTC_OPTIONS", "").split()
    opts = ["--std=c++17"]
    for macro, default in (("KG_BLOCK", BLOCK), ("KG_ILP", ILP)):
        if not any(o.startswith(f"-D{macro}=") for o in extra):
            opts.append(f"-D{macro}={default}")
    return tuple(opts + extra)


def _macro(name: str, default: int) -> int:
    for o in nvrtc_options():
        if o.startswith(f"-D{name}="):
            return int(o.split("=", 1)[1])
    return default  # pragma: no cover


_MODULES: dict[tuple, Any] = {}
_KERNELS: dict[tuple, Any] = {}
_STREAMS: dict[tuple, Any] = {}


def get_kernel(device_index: int, name: str, tdtype: torch.dtype, cdtype: torch.dtype):
    """The compiled kernel ``name`` on a device; compiles its module on first use.

    Raises whatever CuPy/NVRTC raise (``cupy.cuda.compiler.CompileException``, a CUDA error);
    the dispatcher turns that into a fallback (``auto``) or an error (``cupy``).
    """
    key = (device_index, name, nvrtc_options())
    kern = _KERNELS.get(key)
    if kern is not None:
        return kern
    with _LOCK:
        cp = _import_cupy()
        mkey = (device_index, tdtype, cdtype, nvrtc_options())
        with cp.cuda.Device(device_index):
            mod = _MODULES.get(mkey)
            if mod is None:
                mod = cp.RawModule(
                    code=module_source(),
                    options=nvrtc_options(),
                    name_expressions=name_expressions(tdtype, cdtype),
                )
                _MODULES[mkey] = mod
            kern = mod.get_function(name)
            kern.compile()  # compile and load now, so that failures surface here, not at launch
        _KERNELS[key] = kern
        return kern


class _StreamRef:
    """A stream handle in the CUDA stream protocol, for ``cupy.cuda.Stream.from_external``."""

    def __init__(self, ptr: int):
        self.ptr = ptr

    def __cuda_stream__(self) -> tuple[int, int]:
        return (0, self.ptr)


def _external_stream(cp, ptr: int, device_index: int):
    key = (device_index, ptr)
    s = _STREAMS.get(key)
    if s is None:
        try:  # CuPy >= 14: the CUDA stream protocol
            s = cp.cuda.Stream.from_external(_StreamRef(ptr))
        except (AttributeError, TypeError):  # older CuPy
            s = cp.cuda.ExternalStream(ptr, device_index)
        _STREAMS[key] = s
    return s


# -- launch ----------------------------------------------------------------------------------
@dataclass
class LaunchPlan:
    """One kernel launch, fully decided: kernel name, grid and the 30 argument values.

    ``keep`` holds the tensors whose pointers are in ``args`` (alive until the launch).
    """

    name: str
    tdtype: torch.dtype
    cdtype: torch.dtype
    grid: int
    args: tuple
    keep: tuple


def _strides(t: torch.Tensor) -> tuple[int, int]:
    if t.ndim == 1:
        return t.stride(0), 0
    return t.stride(0), t.stride(1)


def _is_flat(t: torch.Tensor, s: int) -> bool:
    if s == 1:
        return t.shape[0] <= 1 or t.stride(0) == 1
    return t.is_contiguous()


@functools.lru_cache(maxsize=16)
def _sm_count(index: int) -> int:
    return int(torch.cuda.get_device_properties(index).multi_processor_count)


def max_blocks(device: torch.device) -> int:
    """Grid size cap: 8 blocks per multiprocessor (about two waves at 4 resident blocks); the
    grid-stride loop covers the rest. 2 for a non-CUDA device (host emulation in the tests:
    few blocks make every thread loop)."""
    if device.type != "cuda":
        return 2
    return 8 * _sm_count(device_index(device))


def kernel_args(
    n: int, s: int, order: int, ins, outs, coefs, goff: torch.Tensor, gtab: torch.Tensor
) -> tuple:
    """The 30 kernel arguments, in the order of ``kg_block`` in ``kernels/kg_common.cuh``.

    Pointers travel as ``numpy.uint64`` and sizes/strides as ``numpy.int64`` (CuPy passes a
    NumPy scalar by value with its own size); absent operands are null pointers.
    """
    args: list = [np.int64(n), np.int64(s), np.int32(order)]
    for group, count in ((ins, 4), (outs, 3)):
        for k in range(count):
            if k < len(group):
                rs, cs = _strides(group[k])
                args += [np.uint64(group[k].data_ptr()), np.int64(rs), np.int64(cs)]
            else:
                args += [np.uint64(0), np.int64(0), np.int64(0)]
    for k in range(3):
        c = coefs[k] if k < len(coefs) else None
        args.append(np.uint64(0 if c is None else c.data_ptr()))
    ng = len(goff) - 1
    args += [np.uint64(goff.data_ptr()), np.int32(ng), np.uint64(gtab.data_ptr())]
    return tuple(args)


def plan_launch(
    kind: str,
    direction: str,
    ins,
    outs,
    coefs,
    goff: torch.Tensor,
    gtab: torch.Tensor,
    grid_cap: int,
) -> LaunchPlan | None:
    """Decide kernel, layout, grid and arguments for one pass; None when there is no work.

    ``ins``/``outs`` are validated ``(n,)``/``(n, s)`` tensors of one dtype (any strides);
    ``coefs`` per-entry vectors (made contiguous here if they are not) or None; ``goff``/``gtab``
    the segment table on the same device (int64 and float64, contiguous).
    """
    ref = ins[0]
    n = ref.shape[0]
    s = 1 if ref.ndim == 1 else ref.shape[1]
    total = n * s
    if total == 0:
        return None
    first = next((c for c in coefs if c is not None), None)
    cdtype = ref.dtype if first is None else first.dtype
    # one storage type for all coefficient vectors; temporaries made here are freed after the
    # launch is enqueued, which is safe: torch reuses their memory only in this stream's order
    coefs = [None if c is None else c.to(cdtype).contiguous() for c in coefs]
    present = [c for c in coefs if c is not None]
    vecs = [*ins, *outs]
    flat = all(_is_flat(t, s) for t in vecs)
    order = 0
    if not flat and s > 1:
        # iterate columns-outer when most operands are column-contiguous ((s, n) memory)
        col = sum(1 for t in vecs if t.stride(0) == 1 and t.stride(1) != 1)
        order = 1 if 2 * col > len(vecs) else 0
    name = (
        f"kg_block<{OP_NAMES[(kind, direction)]}, {TYPE_NAMES[ref.dtype]}, "
        f"{TYPE_NAMES[cdtype]}, {'true' if flat else 'false'}>"
    )
    tile = _macro("KG_BLOCK", BLOCK) * _macro("KG_ILP", ILP)
    grid = min(-(-total // tile), grid_cap)
    args = kernel_args(n, s, order, ins, outs, coefs, goff, gtab)
    return LaunchPlan(name, ref.dtype, cdtype, grid, args, (*vecs, *present, goff, gtab))


def device_index(device: torch.device) -> int:
    """The CUDA ordinal of ``device`` (the current one for a bare ``"cuda"``); 0 otherwise."""
    if device.type != "cuda":
        return 0
    return device.index if device.index is not None else torch.cuda.current_device()


def launch(plan: LaunchPlan, device: torch.device) -> None:
    """Launch a planned kernel on the current torch stream of ``device`` (asynchronous)."""
    cp = _import_cupy()
    index = device_index(device)
    kern = get_kernel(index, plan.name, plan.tdtype, plan.cdtype)
    stream_ptr = torch.cuda.current_stream(index).cuda_stream
    with cp.cuda.Device(index):
        with _external_stream(cp, stream_ptr, index):
            kern((plan.grid,), (_macro("KG_BLOCK", BLOCK),), plan.args)
