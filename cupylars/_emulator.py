"""Run unmodified CUDA kernel sources on the CPU.

CI has no GPU, so the ``.cu``/``.cuh`` sources in ``rawkernels/`` are also
compiled with g++ through a shim header (``rawkernels/cpu_shim``) and launched
through ctypes, with NumPy arrays standing in for device memory.
:class:`EmulatedModule` mirrors the slice of CuPy's ``RawModule``/``RawKernel``
API that the launch code uses, so the same Python launch code drives both::

    mod = EmulatedModule(["rawkernels/lars.cu"], ["lars_stats_f32"])
    fn = mod.get_function("lars_stats_f32")
    fn((blocks,), (256,), (x, out, np.int32(n)))   # like cupy.RawKernel.__call__

Execution model: the CUDA threads of a block are fibers on one OS thread and
blocks run one after another (optionally spread over ``threads`` OS threads).
A launch is synchronous: it has completed when the call returns. See
``rawkernels/cpu_shim/cuda_cpu_shim.h`` for the details of the shim.

Arguments are checked before launching, more strictly than CuPy does: each
kernel exports a descriptor of its parameter types, and a NumPy scalar must
have exactly the parameter's kind and width (``np.int32`` for ``int``,
``np.float32`` for ``float``); Python ints and floats are refused (CuPy would
silently pass them as 64-bit values). Arrays go to pointer parameters, must be
C-contiguous and, where the pointee is an arithmetic type, have a matching
dtype. Raw addresses go to pointer parameters as ``np.uint64``/``np.int64``.

Failures inside a kernel (a failed ``assert``, ``__trap()``, a deadlock at a
barrier, mismatched warp-synchronous calls) and invalid launch configurations
raise :class:`EmulatorError`.

Limits:

* Each fiber has a fixed stack (``stack_size``, 64 KiB by default) with a guard
  page: a kernel with large local arrays that overflows it kills the process
  with SIGSEGV (faulthandler shows the launching line). Raise ``stack_size``.
* Out-of-bounds memory accesses are not detected (they may crash or corrupt).
* Spin-waiting on another block cannot succeed since blocks run one at a time.
* ``extern __shared__`` arrays must be declared at global namespace scope or in
  a function there; each distinct name gets its own 227 KiB buffer.

Floating point follows what the GPU computes for cupylars' kernels, so that a
device run can be compared with the emulator bit for bit:

* No contraction into FMAs (``-ffp-contract=off``); cupylars compiles its
  kernels with NVRTC's ``--fmad=false`` to match, and the sources write every
  fused multiply-add they want (``fmaf``/``__fmaf_rn``).
* float32 subnormals flush to zero, as CuPy's ``-ftz=true`` makes them on the
  GPU: each OS thread of a launch sets FTZ/DAZ (x86-64) or FZ (AArch64) and
  restores the caller's bits afterwards. The CPU flag also flushes float64
  subnormals, which the GPU keeps. On other architectures nothing is flushed
  and :attr:`EmulatedModule.flushes_subnormals` is False.

Environment: ``CUPYLARS_CACHE_DIR`` (compiled modules go to its ``emulator/``
folder; default ``~/.cache/cupylars/emulator``), ``CUPYLARS_EMULATOR_CXX``
(default ``g++``), ``CUPYLARS_EMULATOR_CXXFLAGS`` (extra flags, e.g. ``-g``),
``CUPYLARS_EMULATOR_THREADS`` (default OS threads per launch, 1) and
``CUPYLARS_EMULATOR_SCHEDULE`` (``forward`` or ``reverse``: the order in which
the threads of a block are resumed; reversing it shakes out missing barriers).
"""

from __future__ import annotations

import ctypes
import hashlib
import operator
import os
import re
import shlex
import subprocess
import tempfile
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import _cache

__all__ = [
    "DEFAULT_STACK_SIZE",
    "EmulatedKernel",
    "EmulatedModule",
    "EmulatorCompileError",
    "EmulatorError",
    "shim_dir",
]

DEFAULT_STACK_SIZE = 64 * 1024
# Must equal kAbiVersion in cuda_cpu_shim.h.
_ABI_VERSION = 2
# Must equal kDynamicSharedBytes in cuda_cpu_shim.h.
_DYNAMIC_SHARED_BYTES = 227 * 1024
_SIGNATURE_FIELDS = 5
_MAX_BLOCK_THREADS = 1024
_BASE_FLAGS = (
    "-O2",
    "-std=c++17",
    "-fPIC",
    "-shared",
    "-pthread",
    # IEEE semantics as NVRTC's defaults (prec-div, prec-sqrt); no fused a*b+c.
    "-ffp-contract=off",
    # Kernels type-pun through reinterpret_cast (float4 loads, ...), as nvcc allows.
    "-fno-strict-aliasing",
    # Only the generated entry points are exported; kernels of two modules never interpose.
    "-fvisibility=hidden",
    # Large stack frames probe every page, so a fiber stack overflow always hits the guard page.
    "-fstack-clash-protection",
    # Unresolved symbols (e.g. an undefined extern __shared__ array) fail at build time.
    "-Wl,-z,defs",
)


class EmulatorError(RuntimeError):
    """A launch failed: invalid configuration, or an error inside the kernel."""


class EmulatorCompileError(EmulatorError):
    """g++ could not build the emulated module (its output is in the message)."""


def shim_dir() -> Path:
    """The folder holding ``cuda_cpu_shim.h`` and the stand-in CUDA headers."""
    try:
        from ._paths import kernel_dir

        path = kernel_dir() / "cpu_shim"
        if path.is_dir():
            return path
    except (ImportError, FileNotFoundError):
        pass
    return Path(__file__).resolve().parent / "rawkernels" / "cpu_shim"


# ---- argument types ---------------------------------------------------------------------------------
# Type codes of the signature descriptor (TypeCode in cuda_cpu_shim.h).
_OTHER, _SIGNED, _UNSIGNED, _FLOATING, _BOOL, _POINTER, _HALF, _BFLOAT16, _VOID = range(9)


@dataclass(frozen=True)
class _Param:
    code: int
    size: int
    pointee_code: int
    pointee_size: int
    pointee_align: int

    def describe(self) -> str:
        if self.code == _POINTER:
            return f"pointer to {_type_name(self.pointee_code, self.pointee_size)}"
        return _type_name(self.code, self.size)


def _type_name(code: int, size: int) -> str:
    if code == _SIGNED:
        return f"int{8 * size}"
    if code == _UNSIGNED:
        return f"uint{8 * size}"
    if code == _FLOATING:
        return {4: "float", 8: "double"}.get(size, f"float{8 * size}")
    return {
        _BOOL: "bool",
        _POINTER: "pointer",
        _HALF: "__half",
        _BFLOAT16: "__nv_bfloat16",
        _VOID: "void",
    }.get(code, f"{size}-byte struct")


def _pointee_accepts(param: _Param, dtype: np.dtype) -> bool:
    """Whether an array of ``dtype`` may be passed for the pointer parameter."""
    code, size = param.pointee_code, param.pointee_size
    if code == _VOID or (code in (_SIGNED, _UNSIGNED) and size == 1):
        return True  # byte buffers view any data
    if code in (_SIGNED, _UNSIGNED):
        return dtype.kind in "iu" and dtype.itemsize == size
    if code == _FLOATING:
        return dtype.kind == "f" and dtype.itemsize == size
    if code == _BOOL:
        return dtype.itemsize == 1 and dtype.kind in "biu"
    if code in (_HALF, _BFLOAT16):
        bit_storage = dtype.kind in "iuV"  # uint16 arrays holding the bits
        return dtype.itemsize == 2 and (bit_storage or (code == _HALF and dtype == np.float16))
    if code == _POINTER:  # a table of device addresses
        return dtype.kind in "iu" and dtype.itemsize == 8
    # Structs (float4, __half2, user types): element arrays or raw records of that size.
    return size % dtype.itemsize == 0


def _scalar_accepts(param: _Param, value: np.generic) -> bool:
    dtype = value.dtype
    if param.code == _POINTER:
        return dtype.kind in "iu" and dtype.itemsize == 8
    if param.code in (_SIGNED, _UNSIGNED):
        return dtype.kind in "iu" and dtype.itemsize == param.size
    if param.code == _FLOATING:
        return dtype.kind == "f" and dtype.itemsize == param.size
    if param.code == _BOOL:
        return dtype.kind == "b"
    if param.code == _HALF:
        return dtype == np.float16
    if param.code == _OTHER:
        return dtype.kind == "V" and dtype.itemsize == param.size
    return False


# ---- compilation ------------------------------------------------------------------------------------
_INCLUDE_RE = re.compile(r'^[ \t]*#[ \t]*include[ \t]*([<"])([^>"\n]+)[>"]', re.MULTILINE)
_COMMENT_RE = re.compile(r"//[^\n]*|/\*.*?\*/", re.DOTALL)
_DYNAMIC_SHARED_RE = re.compile(r"\bextern\s+__shared__\s+([^;{}]*?)\[\s*\]\s*;")
_ALIGN_RE = re.compile(r"(?:__align__|alignas)\s*\(\s*(\d+)\s*\)")
_IDENTIFIER_RE = re.compile(r"^[A-Za-z_]\w*$")
_TYPE_RE = re.compile(r"^[\w\s:<>,*]+$")

_lock = threading.Lock()
_libraries: dict[str, tuple[ctypes.CDLL, Path]] = {}
_compiler_ids: dict[str, str] = {}


def _cache_root() -> Path:
    return _cache.cache_root("emulator")


def _compiler_id(cxx: str) -> str:
    """The compiler's version banner and target (part of the cache key)."""
    if cxx not in _compiler_ids:
        try:
            banner = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=True).stdout
            machine = subprocess.run([cxx, "-dumpmachine"], capture_output=True, text=True, check=True).stdout
        except (OSError, subprocess.CalledProcessError) as exc:
            raise EmulatorCompileError(
                f"cannot run the C++ compiler {cxx!r} ({exc}); the CUDA emulator needs g++ "
                "(set CUPYLARS_EMULATOR_CXX to use another)"
            ) from exc
        _compiler_ids[cxx] = banner.strip().splitlines()[0] + "|" + machine.strip()
    return _compiler_ids[cxx]


def _scan_sources(sources: Sequence[Path], include_dirs: Sequence[Path], shim: Path) -> dict[Path, str]:
    """The sources and every header they include from the project (not the shim or system).

    Quoted includes resolve next to the including file first, then like angle
    includes through the include directories, as the compiler does. Includes
    inside #if blocks are followed too, which only makes the cache key broader.
    """
    texts: dict[Path, str] = {}
    pending = list(sources)
    while pending:
        path = pending.pop()
        if path in texts:
            continue
        texts[path] = path.read_text(encoding="utf-8", errors="replace")
        for kind, name in _INCLUDE_RE.findall(texts[path]):
            folders = ([path.parent] if kind == '"' else []) + [shim, *include_dirs]
            for folder in folders:
                candidate = folder / name
                if candidate.is_file():
                    if folder != shim:
                        pending.append(candidate.resolve())
                    break
    return texts


def _dynamic_shared_arrays(texts: Mapping[Path, str]) -> dict[str, tuple[str, int]]:
    """``extern __shared__ T name[];`` declarations: name -> (type, alignment)."""
    arrays: dict[str, tuple[str, int]] = {}
    for path, text in texts.items():
        for declaration in _DYNAMIC_SHARED_RE.findall(_COMMENT_RE.sub(" ", text)):
            alignment = max([16, *(int(a) for a in _ALIGN_RE.findall(declaration))])
            words = _ALIGN_RE.sub(" ", declaration).split()
            if (
                len(words) < 2
                or not _IDENTIFIER_RE.match(words[-1])
                or not _TYPE_RE.match(" ".join(words[:-1]))
            ):
                raise EmulatorCompileError(
                    f"{path}: cannot parse the dynamic shared memory declaration 'extern __shared__ "
                    f"{declaration}[]' (expected 'extern __shared__ TYPE NAME[];')"
                )
            name, ctype = words[-1], " ".join(words[:-1])
            if arrays.get(name, (ctype, 0))[0] != ctype:
                raise EmulatorCompileError(
                    f"extern __shared__ array {name!r} is declared with two types: "
                    f"{arrays[name][0]!r} and {ctype!r}"
                )
            arrays[name] = (ctype, max(alignment, arrays.get(name, ("", 0))[1]))
    return arrays


def _c_string(path: Path) -> str:
    text = str(path)
    if any(c in text for c in '\n\r"\\'):
        raise EmulatorCompileError(f"unsupported character in source path {text!r}")
    return f'"{text}"'


def _translation_unit(
    sources: Sequence[Path], kernel_names: Sequence[str], dynamic_shared: Mapping[str, tuple[str, int]]
) -> str:
    lines = ["// Generated by cupylars._emulator: the kernel sources and their entry points."]
    lines += [f"#include {_c_string(path)}" for path in sources]
    lines.append("")
    if dynamic_shared:
        lines.append("// Storage of the extern __shared__ arrays (one per OS thread, like __shared__).")
    for name, (ctype, alignment) in sorted(dynamic_shared.items()):
        lines.append(
            f"alignas({alignment}) thread_local {ctype} {name}"
            f"[::cupylars_emu::kDynamicSharedBytes / sizeof({ctype})];"
        )
    lines.append("CUPYLARS_EMU_EXPORT_MODULE()")
    lines += [f"CUPYLARS_EMU_EXPORT_KERNEL({name})" for name in kernel_names]
    return "\n".join(lines) + "\n"


def _compile_hint(output: str) -> str:
    hints = []
    if "conflicting specifiers" in output or ("extern" in output and "thread_local" in output):
        hints.append(
            "__shared__ expands to thread_local in the emulator; declare dynamic shared memory "
            "as 'extern __shared__ TYPE NAME[];'"
        )
    if "cupylars_launch_" in output or "CUPYLARS_EMU_EXPORT_KERNEL" in output:
        hints.append(
            "a requested kernel is missing, overloaded or a template: each name must be one "
            'non-template function (extern "C" __global__) in the sources'
        )
    if "undefined reference" in output:
        hints.append("a declared function or extern __shared__ array has no definition in the sources")
    return "".join(f"\nhint: {h}" for h in hints)


def _build(
    sources: Sequence[Path],
    kernel_names: Sequence[str],
    include_dirs: Sequence[Path],
    defines: Mapping[str, str],
    cache_dir: Path | None,
) -> tuple[ctypes.CDLL, Path, bool]:
    """Compile (or reuse) the module; returns the library, its path and whether g++ ran."""
    shim = shim_dir()
    cxx = os.environ.get("CUPYLARS_EMULATOR_CXX", "g++")
    texts = _scan_sources(sources, include_dirs, shim)
    dynamic_shared = _dynamic_shared_arrays(texts)
    unit = _translation_unit(sources, kernel_names, dynamic_shared)
    flags = [
        *_BASE_FLAGS,
        *shlex.split(os.environ.get("CUPYLARS_EMULATOR_CXXFLAGS", "")),
        "-I",
        str(shim),
        *(arg for d in include_dirs for arg in ("-I", str(d))),
        *(f"-D{k}={v}" for k, v in sorted(defines.items())),
        "-include",
        str(shim / "cuda_cpu_shim.h"),
    ]

    digest = hashlib.sha256()

    def feed(*parts: str | bytes) -> None:
        for part in parts:
            data = part.encode() if isinstance(part, str) else part
            digest.update(len(data).to_bytes(8, "little") + data)

    feed(str(_ABI_VERSION), _compiler_id(cxx), unit, *flags)
    for path in sorted(shim.iterdir()):
        if path.is_file():
            feed(path.name, path.read_bytes())
    for path in sorted(texts):
        feed(str(path), texts[path])
    key = digest.hexdigest()[:32]

    with _lock:
        if key in _libraries:
            library, library_path = _libraries[key]
            return library, library_path, False
        # Loaded code must come from a folder and file that only this user can write, and
        # match the digest recorded when it was built (cupylars._cache).
        folder = _cache.private_folder(Path(cache_dir) if cache_dir is not None else _cache_root())
        library_path = folder / f"module-{key}.so"

        def accept(library: ctypes.CDLL) -> None:
            if library.cupylars_emu_abi_version() != _ABI_VERSION:
                raise _cache.LibraryError(f"{library_path} was built for another emulator version")

        try:
            library, compiled = _cache.load_library(
                library_path, lambda output: _compile(cxx, flags, unit, folder, key, output), accept
            )
        except _cache.LibraryError as exc:
            raise EmulatorCompileError(str(exc)) from None
        _libraries[key] = (library, library_path)
        return library, library_path, compiled


def _compile(cxx: str, flags: Sequence[str], unit: str, folder: Path, key: str, output: Path) -> None:
    # The translation unit is kept beside the library (compiler messages point into it);
    # the library goes to `output`, a temporary name that cupylars._cache renames into place.
    source = folder / f"module-{key}.cpp"
    with tempfile.NamedTemporaryFile("w", dir=folder, suffix=".cpp", delete=False) as handle:
        handle.write(unit)
    os.replace(handle.name, source)
    command = [cxx, *flags, str(source), "-o", str(output)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        text = (result.stdout + result.stderr).strip()
        raise EmulatorCompileError(
            f"g++ failed to build the emulated CUDA module ({source}):\n{text}{_compile_hint(text)}"
        )


def _clear_memory_cache() -> None:
    """Forget the modules loaded by this process (tests use it to exercise the disk cache)."""
    with _lock:
        _libraries.clear()


# ---- modules and kernels ---------------------------------------------------------------------------
def _dims(value: Any, what: str) -> tuple[int, int, int]:
    if isinstance(value, (tuple, list)):
        items = list(value)
    else:
        items = [value]
    if not 1 <= len(items) <= 3:
        raise ValueError(f"{what} must be an int or a tuple of 1 to 3 ints, got {value!r}")
    try:
        dims = [operator.index(v) for v in items]
    except TypeError:
        raise TypeError(f"{what} must be an int or a tuple of 1 to 3 ints, got {value!r}") from None
    x, y, z = [*dims, 1, 1][:3]
    return x, y, z


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    return int(raw) if raw else default


class EmulatedKernel:
    """One ``extern "C" __global__`` kernel; call it like ``cupy.RawKernel``."""

    def __init__(self, module: EmulatedModule, name: str, library: ctypes.CDLL) -> None:
        self.module = module
        self.name = name
        self._launch = getattr(library, f"cupylars_launch_{name}")
        self._launch.restype = ctypes.c_int
        self._launch.argtypes = [
            ctypes.POINTER(ctypes.c_longlong),
            ctypes.POINTER(ctypes.c_void_p),
            ctypes.c_int,
            ctypes.c_char_p,
            ctypes.c_ulong,
        ]
        describe = getattr(library, f"cupylars_signature_{name}")
        describe.restype = ctypes.c_int
        describe.argtypes = [ctypes.POINTER(ctypes.c_int), ctypes.c_int]
        count = describe(None, 0)
        fields = (ctypes.c_int * max(1, count * _SIGNATURE_FIELDS))()
        describe(fields, len(fields))
        self.params: tuple[_Param, ...] = tuple(
            _Param(*fields[i * _SIGNATURE_FIELDS : (i + 1) * _SIGNATURE_FIELDS]) for i in range(count)
        )

    def __repr__(self) -> str:
        params = ", ".join(p.describe() for p in self.params)
        return f"<EmulatedKernel {self.name}({params})>"

    def __call__(
        self,
        grid: int | tuple[int, ...],
        block: int | tuple[int, ...],
        args: tuple[Any, ...],
        *,
        shared_mem: int = 0,
    ) -> None:
        """Launch on the CPU and wait for completion (a synchronous "stream")."""
        grid3, block3 = _dims(grid, "grid"), _dims(block, "block")
        self._check_config(grid3, block3, shared_mem)
        if not isinstance(args, (tuple, list)):
            raise TypeError(f"{self.name}: args must be a tuple, got {type(args).__name__}")
        if len(args) != len(self.params):
            raise TypeError(f"{self.name}: the kernel takes {len(self.params)} argument(s), got {len(args)}")
        buffers = [self._argument(i, arg, param) for i, (arg, param) in enumerate(zip(args, self.params))]
        argv = (ctypes.c_void_p * max(1, len(buffers)))(*(ctypes.addressof(b) for b in buffers))
        module = self.module
        config = (ctypes.c_longlong * 9)(*grid3, *block3, module.threads, module.stack_size, module.reverse)
        error = ctypes.create_string_buffer(4096)
        status = self._launch(config, argv, len(buffers), error, len(error))
        if status != 0:
            raise EmulatorError(f"{self.name}: {error.value.decode(errors='replace')}")

    def passes_by_value(self, index: int) -> bool:
        """Whether parameter ``index`` is a value (a scalar or struct), not a pointer: an
        array passed there is copied into the launch, as CuPy copies a size-1 host array."""
        return self.params[index].code != _POINTER

    def _check_config(self, grid: tuple[int, int, int], block: tuple[int, int, int], shared_mem: int) -> None:
        # CUDA's limits (compute capability 7.0 and later); the GPU refuses such launches too.
        gx, gy, gz = grid
        bx, by, bz = block
        if min(grid) < 1 or gx > 2**31 - 1 or gy > 65535 or gz > 65535:
            raise EmulatorError(f"{self.name}: invalid grid {grid} (x <= 2^31-1, y and z <= 65535, all >= 1)")
        if min(block) < 1 or bx > 1024 or by > 1024 or bz > 64 or bx * by * bz > _MAX_BLOCK_THREADS:
            raise EmulatorError(
                f"{self.name}: invalid block {block} (x, y <= 1024, z <= 64, at most "
                f"{_MAX_BLOCK_THREADS} threads, all >= 1)"
            )
        shared = operator.index(shared_mem)
        if not 0 <= shared <= _DYNAMIC_SHARED_BYTES:
            raise EmulatorError(
                f"{self.name}: shared_mem={shared} is outside [0, {_DYNAMIC_SHARED_BYTES}] bytes"
            )

    def _argument(self, index: int, arg: Any, param: _Param) -> ctypes.Array:
        """The bytes of one argument, as the kernel's parameter type expects them."""
        where = f"{self.name}: argument {index} (parameter type {param.describe()})"
        if isinstance(arg, np.ndarray) and self.passes_by_value(index):
            # CuPy passes a size-1 host array by value (how structs travel on CuPy 13 and 14).
            if arg.size != 1 or arg.dtype.kind != "V" or arg.dtype.itemsize != param.size:
                raise TypeError(
                    f"{where} got an ndarray of shape {arg.shape} and dtype {arg.dtype}; pass a struct "
                    "by value as a size-1 structured array (or NumPy scalar) of the parameter's size"
                )
            raw = arg.tobytes()
        elif isinstance(arg, np.ndarray):
            if not arg.flags.c_contiguous:
                raise ValueError(f"{where}: the array is not C-contiguous")
            if not _pointee_accepts(param, arg.dtype):
                raise TypeError(f"{where} got an array of dtype {arg.dtype}")
            address = arg.ctypes.data
            if arg.size and address % max(1, param.pointee_align):
                raise ValueError(f"{where}: the array's address is not {param.pointee_align}-byte aligned")
            raw = np.uint64(address).tobytes()
        elif isinstance(arg, np.generic):
            if not _scalar_accepts(param, arg):
                raise TypeError(f"{where} got a NumPy {arg.dtype} scalar")
            if param.code == _POINTER and int(arg) % max(1, param.pointee_align):
                # A raw address: its pointee is read at its natural alignment like an array's.
                raise ValueError(f"{where}: address {int(arg):#x} is not {param.pointee_align}-byte aligned")
            raw = arg.tobytes()
        elif isinstance(arg, (bool, int, float, complex)):
            raise TypeError(
                f"{where} got a Python {type(arg).__name__}; pass a NumPy scalar with an explicit "
                "width (e.g. np.int32(...), np.float32(...)) or an array"
            )
        else:
            raise TypeError(f"{where} got {type(arg).__name__}; expected a NumPy array or scalar")
        return ctypes.create_string_buffer(raw, max(8, len(raw)))


class EmulatedModule:
    """Kernel sources compiled for the CPU; the counterpart of ``cupy.RawModule``.

    ``source_paths`` are compiled together, unchanged, in one translation unit
    (like one NVRTC program) with the shim folder first on the include path,
    then ``include_dirs``; ``defines`` become ``-D`` flags. Builds are cached on
    disk, keyed by everything that affects them, and loaded once per process.

    ``threads``: OS threads sharing a launch's blocks (default 1, or
    ``$CUPYLARS_EMULATOR_THREADS``). ``stack_size``: bytes of stack per CUDA
    thread. ``schedule``: ``"forward"`` or ``"reverse"`` resumption order of a
    block's threads (default ``$CUPYLARS_EMULATOR_SCHEDULE`` or forward).
    """

    def __init__(
        self,
        source_paths: Sequence[str | Path],
        kernel_names: Sequence[str],
        include_dirs: Sequence[str | Path] = (),
        defines: Mapping[str, str] | None = None,
        *,
        cache_dir: str | Path | None = None,
        threads: int | None = None,
        stack_size: int = DEFAULT_STACK_SIZE,
        schedule: str | None = None,
    ) -> None:
        if isinstance(source_paths, (str, Path)) or isinstance(kernel_names, str):
            raise TypeError("source_paths and kernel_names must be sequences, not a single string")
        sources = [Path(p).resolve() for p in source_paths]
        for path in sources:
            if not path.is_file():
                raise FileNotFoundError(f"CUDA source not found: {path}")
        names = list(dict.fromkeys(kernel_names))
        for name in names:
            if not _IDENTIFIER_RE.match(name):
                raise ValueError(f"kernel name {name!r} is not a C identifier (templates are not supported)")
        define_map = dict(defines or {})
        for key in define_map:
            if not _IDENTIFIER_RE.match(key):
                raise ValueError(f"macro name {key!r} is not a C identifier")
        self.threads = threads if threads is not None else _env_int("CUPYLARS_EMULATOR_THREADS", 1)
        if self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if stack_size < 16 * 1024:
            raise ValueError(f"stack_size must be at least 16 KiB, got {stack_size}")
        self.stack_size = int(stack_size)
        schedule = schedule or os.environ.get("CUPYLARS_EMULATOR_SCHEDULE") or "forward"
        if schedule not in ("forward", "reverse"):
            raise ValueError(f"schedule must be 'forward' or 'reverse', got {schedule!r}")
        self.reverse = schedule == "reverse"
        library, self.library_path, self.compiled = _build(
            sources,
            names,
            [Path(d).resolve() for d in include_dirs],
            {k: str(v) for k, v in define_map.items()},
            Path(cache_dir) if cache_dir is not None else None,
        )
        self._kernels = {name: EmulatedKernel(self, name, library) for name in names}
        #: Whether launches flush subnormals to zero like the GPU (-ftz=true); False only
        #: on a CPU architecture whose flush control the shim does not know.
        self.flushes_subnormals = bool(library.cupylars_emu_flushes_subnormals())

    @property
    def kernel_names(self) -> tuple[str, ...]:
        return tuple(self._kernels)

    def get_function(self, name: str) -> EmulatedKernel:
        """The kernel ``name`` (one of the ``kernel_names`` the module was built with)."""
        try:
            return self._kernels[name]
        except KeyError:
            raise KeyError(
                f"kernel {name!r} was not exported by this module (built with {sorted(self._kernels)})"
            ) from None
