"""Optional native CPU kernels (``native/*.cpp``), compiled on first use and cached; pure-torch fallbacks.

The kernels are plain C functions on raw buffers (no torch headers: they compile in about a second with
the system's C++ compiler) loaded with :mod:`ctypes`.  They are built once per source, compiler and CPU
into ``$HF_EOT_CACHE`` (default ``~/.cache/hf_eot``) with ``-O3 -march=native -ffast-math -fopenmp`` (the
process's floating-point state is left alone: see :data:`_COMPILE_FLAGS`), and used on CPU tensors in
eager mode.  If no compiler is found or the build fails, hf_eot warns once and
keeps its pure-torch path (same values to round-off, slower).  ``HF_EOT_NATIVE=0`` turns them off.

Kernels: entmax rows, as supports (:func:`entmax_rows`, for :mod:`hf_eot.ops.sparse_attention`: Newton's
method for general alpha, exact for sparsemax and 1.5-entmax) or dense rows by Newton's method
(:func:`entmax_dense_rows`, for :func:`hf_eot.ops.entmax_newton_weights`).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

_SOURCE = Path(__file__).parent / "native" / "entmax_support.cpp"
#: Compiled with -ffast-math (vectorised exp / log), linked without it: linking a shared library with it
#: adds crtfastmath.o (GCC < 13), which flushes denormals to zero in the whole process when it loads.
_COMPILE_FLAGS = ("-O3", "-march=native", "-ffast-math", "-fopenmp", "-fPIC", "-std=c++17", "-c")
#: -lm (the vectorised exp / log are glibc's libmvec) and -lstdc++: g++ links both by itself, a C driver
#: (CXX=gcc) does not; undefined symbols fail the link instead of the load.
_LINK_FLAGS = ("-shared", "-fopenmp", "-Wl,--no-undefined", "-lm", "-lstdc++")
#: Seconds a compiler call may take before the build counts as failed.
_BUILD_TIMEOUT = 120
#: ``HF_EOT_NATIVE``: "0" turns the native kernels off.
ENV_SWITCH = "HF_EOT_NATIVE"


class NativeBuildWarning(UserWarning):
    """The native kernels could not be built: hf_eot uses its (slower) pure-torch path."""


def _compiler() -> list[str] | None:
    """The C++ compiler's command: ``$CXX`` (it may hold arguments, e.g. "ccache g++"), else ``c++`` /
    ``g++`` / ``clang++`` on the PATH; None if it is not found."""
    if os.environ.get("CXX"):
        command = shlex.split(os.environ["CXX"])
        path = shutil.which(command[0]) if command else None
        return None if path is None else [path, *command[1:]]
    for name in ("c++", "g++", "clang++"):
        path = shutil.which(name)
        if path:
            return [path]
    return None


def _cpu_signature() -> str:
    """What ``-march=native`` depends on: the machine and, on Linux, the CPU's flags."""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = line
                break
    except OSError:
        pass
    return f"{platform.machine()} {flags}"


def _cache_dir() -> Path:
    return Path(os.environ.get("HF_EOT_CACHE", Path.home() / ".cache" / "hf_eot")) / "native"


def _build(compiler: list[str]) -> Path:
    """The shared library for this source, compiler and CPU, compiled if not cached (atomically: several
    processes may build at once; the last rename wins, with identical contents; a library that does not
    load is never cached)."""
    version = subprocess.run(
        [*compiler, "--version"], capture_output=True, text=True, check=True, timeout=_BUILD_TIMEOUT
    ).stdout
    key = [_SOURCE.read_text(), *compiler, version, *_COMPILE_FLAGS, *_LINK_FLAGS, _cpu_signature()]
    digest = hashlib.sha256("\n".join(key).encode()).hexdigest()[:16]
    library = _cache_dir() / f"hf_eot_native_{digest}.so"
    if library.exists():
        return library
    library.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=library.parent) as tmp:
        target, objects = Path(tmp) / library.name, Path(tmp) / "kernels.o"
        for command in (
            [*compiler, *_COMPILE_FLAGS, str(_SOURCE), "-o", str(objects)],
            [*compiler, str(objects), *_LINK_FLAGS, "-o", str(target)],
        ):
            result = subprocess.run(command, capture_output=True, text=True, timeout=_BUILD_TIMEOUT)
            if result.returncode != 0:
                raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr.strip()[-2000:]}")
        ctypes.CDLL(str(target))  # loads (OSError otherwise) before it is cached
        os.replace(target, library)
    return library


def switched_on() -> bool:
    """Whether the native kernels may be used: ``HF_EOT_NATIVE`` is not "0" (read at every call)."""
    return os.environ.get(ENV_SWITCH, "1") != "0"


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The loaded kernels, or None (not Linux, or the build failed: warned once)."""
    if not sys.platform.startswith("linux"):
        return None
    compiler = _compiler()
    try:
        if compiler is None:
            raise RuntimeError(f"no C++ compiler found (CXX={os.environ.get('CXX')!r}, c++, g++, clang++)")
        lib = ctypes.CDLL(str(_build(compiler)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        warnings.warn(
            f"hf_eot: the native CPU kernels could not be built ({error}); using the pure-torch path "
            f"(same values, slower). Set {ENV_SWITCH}=0 to silence this.",
            NativeBuildWarning,
            stacklevel=3,
        )
        return None
    i64, ptr, f64 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_double
    for suffix in ("f32", "f64"):
        solve = getattr(lib, f"hf_eot_entmax_support_{suffix}")
        solve.argtypes = [ptr, i64, i64, ptr, ptr, f64, i64, ptr, ptr, ptr, ptr, ctypes.c_int]
        solve.restype = None
        dense = getattr(lib, f"hf_eot_entmax_dense_{suffix}")
        dense.argtypes = [ptr, i64, i64, ptr, i64, ptr, ptr, ctypes.c_int]
        dense.restype = None
        gather = getattr(lib, f"hf_eot_gather_support_{suffix}")
        gather.argtypes = [ptr, ptr, ptr, i64, i64, ptr, ptr, ptr, ctypes.c_int]
        gather.restype = None
    return lib


def native_kernels_available() -> bool:
    """Whether hf_eot's native CPU kernels are switched on and built (building them on the first call)."""
    return switched_on() and _library() is not None


_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}


def entmax_support_applies(logits: Tensor, alpha: float) -> bool:
    """Whether :func:`entmax_rows` takes these logits: CPU, float32 / float64, eager mode, ``1 < alpha
    <= 2`` (Newton's convex case, and the exact maps), keys indexable by int32, and the kernels built."""
    return (
        logits.device.type == "cpu"
        and logits.dtype in _SUFFIX
        and 1.0 < alpha <= 2.0
        and logits.shape[-1] < 2**31
        and not torch.compiler.is_compiling()
        and native_kernels_available()
    )


@dataclass
class EntmaxRows:
    """Rows solved by :func:`entmax_rows` (``R`` rows of ``n`` keys): each row's support weights and keys
    at the front of its row of ``values`` ``(R, n)`` and ``keys`` ``(R, n)`` int32 (keys ascending), support
    sizes ``counts`` ``(R,)`` and thresholds ``tau`` ``(R,)`` (-1 for the rows not solved)."""

    values: Tensor
    keys: Tensor
    counts: Tensor
    tau: Tensor

    def packed(self) -> tuple[Tensor, Tensor, Tensor]:
        """The supports one after the other: ``(weights, keys, rows)`` ``(nnz,)`` each, rows ascending."""
        n_rows, n_keys = self.values.shape
        crow = torch.zeros(n_rows + 1, dtype=torch.int64)
        torch.cumsum(self.counts, dim=0, out=crow[1:])
        nnz = int(crow[-1])
        weights = self.values.new_empty(nnz)
        keys = torch.empty(nnz, dtype=torch.int64)
        rows = torch.empty(nnz, dtype=torch.int64)
        _function("gather_support", self.values.dtype)(
            self.values.data_ptr(), self.keys.data_ptr(), crow.data_ptr(), n_rows, n_keys,
            weights.data_ptr(), keys.data_ptr(), rows.data_ptr(), torch.get_num_threads(),
        )  # fmt: skip
        return weights, keys, rows


def _function(name: str, dtype: torch.dtype) -> ctypes._CFuncPtr:
    lib = _library()
    assert lib is not None, "the native kernels are not available: ask entmax_support_applies first"
    return getattr(lib, f"hf_eot_{name}_{_SUFFIX[dtype]}")


def entmax_rows(
    logits: Tensor,
    row_max: Tensor,
    row_valid: Tensor | None,
    alpha: float,
    max_iters: int,
    scratch: EntmaxRows | None = None,
) -> EntmaxRows:
    """alpha-entmax (``1 < alpha <= 2``) of every row of ``logits`` ``(R, n)`` (masked keys at -inf) over
    the row's candidates ``(alpha - 1)(L_j - m) > -1``: by Newton's method on the threshold, at most
    ``max_iters`` steps, or exactly for sparsemax (``alpha = 2``) and 1.5-entmax (the closed form on the
    final support, as their sort-based thresholds; weights without a normaliser).  ``row_max`` ``(R,)``
    must be finite on the rows solved: those in ``row_valid`` ``(R,)`` bool (all without it); the others
    get no entries.  ``scratch``: the result of an earlier call
    on logits of the same shape and dtype whose ``values`` and ``keys`` may be overwritten (a blocked
    caller's previous block: fresh ``(R, n)`` buffers of every block would be paged in again, each time
    a block's supports are packed and the buffers freed).  Requires :func:`entmax_support_applies`."""
    n_rows, n_keys = logits.shape
    logits, row_max = logits.contiguous(), row_max.to(logits.dtype).contiguous()
    valid = None if row_valid is None else row_valid.to(torch.uint8).contiguous()
    reuse = scratch is not None and (scratch.values.shape, scratch.values.dtype) == (logits.shape, logits.dtype)
    rows = EntmaxRows(
        values=scratch.values if reuse else torch.empty_like(logits),
        keys=scratch.keys if reuse else torch.empty((n_rows, n_keys), dtype=torch.int32),
        counts=torch.empty(n_rows, dtype=torch.int64),
        tau=logits.new_empty(n_rows),
    )
    _function("entmax_support", logits.dtype)(
        logits.data_ptr(), n_rows, n_keys, row_max.data_ptr(), None if valid is None else valid.data_ptr(),
        float(alpha), max_iters, rows.values.data_ptr(), rows.keys.data_ptr(), rows.counts.data_ptr(),
        rows.tau.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    return rows


def entmax_dense_rows_apply(X: Tensor, am1: Tensor | float) -> bool:
    """Whether :func:`entmax_dense_rows` takes these rows: CPU, float32 / float64, eager mode, no NaN in
    ``X`` (a row of -inf logits or a +inf one: the torch path gives NaN rows, as it should), every
    ``alpha - 1`` in ``(0, 1)`` (a tensor's checked here: no host synchronisation on CPU), kernels built."""
    if X.device.type != "cpu" or X.dtype not in _SUFFIX or torch.compiler.is_compiling():
        return False
    if X.shape[-1] >= 2**31 or not native_kernels_available():  # keys are int32 in the kernel
        return False
    if isinstance(am1, Tensor):
        if am1.device.type != "cpu" or not bool(((am1 > 0) & (am1 < 1)).all()):
            return False
    elif not 0.0 < am1 < 1.0:
        return False
    return not bool(X.isnan().any())


def entmax_dense_rows(X: Tensor, am1: Tensor | float, max_iters: int) -> tuple[Tensor, Tensor]:
    """alpha-entmax of rows already shifted and scaled, ``X = max((alpha - 1)(L - max L), -1)`` ``(..., n)``
    (masked keys at -1), with ``alpha - 1 = am1`` (float, or a tensor broadcastable to ``X[..., :1]``):
    ``(p, tau)``, ``p`` of ``X``'s shape and ``tau`` ``(..., 1)``.  Powers below ``exp(0.9 log tiny)``
    (float32: 8e-35) come out at that floor, as in the torch path for a float alpha (a tensor alpha's torch
    path gives them exactly, down to 0).  Requires :func:`entmax_dense_rows_apply`."""
    n_keys = X.shape[-1]
    rows = X.reshape(-1, n_keys).contiguous()
    am1_rows = torch.as_tensor(am1, dtype=X.dtype).expand(*X.shape[:-1], 1).reshape(-1).contiguous()
    p = torch.empty_like(rows)
    tau = rows.new_empty(rows.shape[0])
    _function("entmax_dense", X.dtype)(
        rows.data_ptr(), rows.shape[0], n_keys, am1_rows.data_ptr(), max_iters,
        p.data_ptr(), tau.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    return p.view(X.shape), tau.view(*X.shape[:-1], 1)
