"""Folders of compiled native code (the CPU backend's library, the emulator's modules).

A cached library is native code loaded into the process, so it is guarded like
one. The trust rule, checked on the folder's real path (symbolic links resolved):

* every directory from ``/`` down to the cache folder belongs to the current
  user or to root;
* none of them can be written by others (group or world), with one exception:
  a directory above the cache folder may be writable by others if it has the
  sticky bit (``/tmp``). The sticky bit stops others from renaming or removing
  entries they do not own, and the entry below it is itself checked (it belongs
  to the user or to root), so nobody else can swap it;
* the cache folder itself belongs to the current user and nobody else can
  write it (no sticky exception: others could add files to it).

A folder that fails the rule is not used: the library is built in a private
temporary folder, with a warning that names the offending path. Every
directory above a trusted folder can only be changed by the user or root, so
the folder cannot be swapped between the check and the load.

Cache folders are created 0700. A build compiles under a temporary name,
records the library's SHA-256 digest in a sidecar file (``<library>.sha256``,
written under a temporary name and renamed too) and renames the library into
place; builds and loads of one folder hold an exclusive ``flock`` on it, so
concurrent processes never see a library without its digest. A library is
opened with ``O_NOFOLLOW``, checked with ``fstat`` on that descriptor (a
regular file, the user's, nobody else can write it), its bytes are read
through the descriptor and compared with the digest, and the descriptor
itself is loaded (``/proc/self/fd/N``): the checked file is the loaded file.
A library that fails the digest or the load (truncated, overwritten, from an
older version without a digest) is rebuilt once; only a second failure is
reported (:class:`LibraryError`).
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import os
import stat
import struct
import subprocess
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

__all__ = [
    "LibraryError",
    "cache_root",
    "compile_library",
    "folder_problem",
    "load_library",
    "private_folder",
    "trusted",
]

_fallbacks: dict[Path, Path] = {}
_lock = threading.Lock()
# Descriptors of loaded libraries, kept open for the life of the process: dlopen knows an
# object by the name it was opened with, so a reused /proc/self/fd/N would name an older one.
_library_descriptors: list[int] = []
_OTHERS_WRITE = stat.S_IWGRP | stat.S_IWOTH
DIGEST_SUFFIX = ".sha256"


class LibraryError(OSError):
    """A cached library could not be verified or loaded, even after a rebuild."""


def cache_root(kind: str) -> Path:
    """``$CUPYLARS_CACHE_DIR/<kind>``, else ``$XDG_CACHE_HOME`` or ``~/.cache``, ``/cupylars/<kind>``."""
    base = os.environ.get("CUPYLARS_CACHE_DIR")
    if base:
        return Path(base) / kind
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "cupylars" / kind


def _trusted_owner(uid: int) -> bool:
    return uid in (os.getuid(), 0)


def _entry_problem(info: os.stat_result, path: Path, what: str) -> str | None:
    """Why a file or folder with ``info`` may not hold code we load (None: it may)."""
    if stat.S_ISLNK(info.st_mode):
        return f"{path} is a symbolic link"
    if what == "folder" and not stat.S_ISDIR(info.st_mode):
        return f"{path} is not a folder"
    if what == "file" and not stat.S_ISREG(info.st_mode):
        return f"{path} is not a regular file"
    if info.st_uid != os.getuid():
        return f"{path} belongs to uid {info.st_uid}, not to the current user ({os.getuid()})"
    if info.st_mode & _OTHERS_WRITE:
        return f"{path} can be written by others (mode {stat.filemode(info.st_mode)})"
    return None


def _problem(path: Path, what: str) -> str | None:
    try:
        info = os.lstat(path)
    except OSError as exc:
        return f"cannot inspect {path}: {exc}"
    return _entry_problem(info, path, what)


def folder_problem(folder: Path) -> str | None:
    """Why another user could change what ``folder`` holds (None: nobody but the user and
    root can); the trust rule of the module docstring."""
    real = Path(os.path.realpath(folder))
    chain = [*reversed(real.parents), real]  # "/" first
    for path in chain[:-1]:
        try:
            info = os.lstat(path)
        except OSError as exc:
            return f"cannot inspect {path}: {exc}"
        if not stat.S_ISDIR(info.st_mode):  # a link swapped in after realpath
            return f"{path} is not a folder"
        if not _trusted_owner(info.st_uid):
            return f"{path} belongs to uid {info.st_uid}, neither the current user ({os.getuid()}) nor root"
        if info.st_mode & _OTHERS_WRITE and not info.st_mode & stat.S_ISVTX:
            return f"{path} can be written by others (mode {stat.filemode(info.st_mode)})"
    return _problem(real, "folder")


def trusted(path: Path) -> bool:
    """Whether ``path`` is a regular file the current user owns and nobody else can write."""
    return _problem(path, "file") is None


def _make_folders(folder: Path) -> None:
    """``folder`` and its missing parents, each created 0700."""
    missing = []
    for path in [folder, *folder.parents]:
        if os.path.lexists(path):
            break
        missing.append(path)
    for path in reversed(missing):
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass  # another process made it: the check that follows judges it


def private_folder(folder: Path) -> Path:
    """``folder`` (its real path), created 0700 if missing, if it passes the trust rule;
    otherwise a private temporary folder for this process (with a warning naming the
    offending path)."""
    folder = Path(folder)
    with _lock:
        if folder in _fallbacks:
            return _fallbacks[folder]
        try:
            _make_folders(folder)
            problem = folder_problem(folder)
        except OSError as exc:
            problem = f"cannot create {folder}: {exc}"
        if problem is None:
            return Path(os.path.realpath(folder))  # the checked path, not links that lead to it
        fallback = Path(tempfile.mkdtemp(prefix="cupylars-"))  # 0700, owned by us
        fallback_problem = folder_problem(fallback)
        if fallback_problem is not None:
            raise LibraryError(
                f"cupylars: neither the cache folder {folder} ({problem}) nor a temporary folder "
                f"({fallback_problem}) is safe for compiled code; set CUPYLARS_CACHE_DIR or TMPDIR "
                "to a folder of your own"
            )
        warnings.warn(
            f"cupylars: not using the cache folder {folder} ({problem}); compiled code goes to the "
            f"private folder {fallback} for this process. Fix the owner and mode of that path, or set "
            "CUPYLARS_CACHE_DIR to a folder of your own.",
            RuntimeWarning,
            stacklevel=3,
        )
        _fallbacks[folder] = fallback
        return fallback


def compile_library(command: Sequence[str], source: str, folder: Path, output: Path) -> str | None:
    """Compile ``source`` (C++ text) with ``command`` (compiler and flags) into ``output``.

    Returns None on success, else the compiler's output. The source is written
    to a temporary file in ``folder`` and removed afterwards.
    """
    with tempfile.NamedTemporaryFile("w", dir=folder, suffix=".cpp", delete=False) as handle:
        handle.write(source)
    try:
        result = subprocess.run([*command, handle.name, "-o", str(output)], capture_output=True, text=True)
        if result.returncode != 0:
            return (result.stdout + result.stderr).strip() or f"exit status {result.returncode}"
        return None
    finally:
        os.unlink(handle.name)


@contextmanager
def _folder_locked(folder: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``folder`` (between processes) and this module's lock."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _read_all(fd: int) -> bytes:
    chunks = []
    offset = 0
    while chunk := os.pread(fd, 1 << 20, offset):
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def _open_checked(path: Path) -> int:
    """A descriptor of ``path``, opened without following a link and checked with fstat."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise LibraryError(f"cannot open {path}: {exc}") from None
    problem = _entry_problem(os.fstat(fd), path, "file")
    if problem is not None:
        os.close(fd)
        raise LibraryError(problem)
    return fd


def _recorded_digest(target: Path) -> str:
    sidecar = target.with_name(target.name + DIGEST_SUFFIX)
    fd = _open_checked(sidecar)
    try:
        return os.pread(fd, 256, 0).decode("ascii", errors="replace").strip()
    finally:
        os.close(fd)


def _truncation(data: bytes) -> str | None:
    """Why an ELF64 file's loadable segments do not fit in ``data`` (None: they fit).

    The loader maps segments beyond the end of a truncated file, and the first touch of
    such a page kills the process with SIGBUS: a short file is refused here instead.
    """
    if len(data) < 64 or data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return None  # not a little-endian ELF64 file: the loader judges it
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    if phoff + phnum * phentsize > len(data):
        return f"its program headers end at byte {phoff + phnum * phentsize}, past its end ({len(data)})"
    for i in range(phnum):
        header = phoff + i * phentsize
        kind, _flags, offset, _vaddr, _paddr, filesz = struct.unpack_from("<IIQQQQ", data, header)
        if kind == 1 and offset + filesz > len(data):  # PT_LOAD
            return f"a loadable segment ends at byte {offset + filesz}, past its end ({len(data)})"
    return None


def _descriptor_path(fd: int) -> str:
    return f"/proc/self/fd/{fd}" if os.path.isdir("/proc/self/fd") else f"/dev/fd/{fd}"


def _load_verified(target: Path, accept: Callable[[ctypes.CDLL], None]) -> ctypes.CDLL:
    """``target`` loaded through the descriptor whose bytes matched the recorded digest."""
    fd = _open_checked(target)
    try:
        data = _read_all(fd)
        recorded = _recorded_digest(target)
        if hashlib.sha256(data).hexdigest() != recorded:
            raise LibraryError(f"{target} does not match its recorded digest (damaged or incomplete)")
        truncated = _truncation(data)
        if truncated is not None:
            raise LibraryError(f"{target} is truncated: {truncated}")
        try:
            library = ctypes.CDLL(_descriptor_path(fd))
        except OSError as exc:
            raise LibraryError(f"cannot load {target}: {exc}") from None
        try:
            accept(library)
        except AttributeError as exc:  # a function the caller looks for is missing
            raise LibraryError(f"{target} is not the library expected: {exc}") from None
    except BaseException:
        os.close(fd)
        raise
    _library_descriptors.append(fd)
    return library


def _write_private(folder: Path, data: bytes, suffix: str) -> str:
    fd, name = tempfile.mkstemp(dir=folder, suffix=suffix)  # 0600, ours
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    return name


def _build_into(target: Path, build: Callable[[Path], None]) -> None:
    """``build(partial)`` writes a library; it is made private, its digest recorded beside
    it and both renamed into place (library first: a crash between leaves a mismatch)."""
    folder = target.parent
    fd, partial = tempfile.mkstemp(dir=folder, suffix=".so.tmp")
    os.close(fd)
    sidecar = None
    try:
        build(Path(partial))
        os.chmod(partial, 0o700)  # the linker's mode follows the umask; nobody else may write it
        with open(partial, "rb") as handle:
            digest = hashlib.sha256(handle.read()).hexdigest()
        sidecar = _write_private(folder, (digest + "\n").encode(), DIGEST_SUFFIX + ".tmp")
        os.replace(partial, target)
        os.replace(sidecar, target.with_name(target.name + DIGEST_SUFFIX))
    finally:
        for leftover in (partial, sidecar):
            if leftover is not None and os.path.exists(leftover):
                os.unlink(leftover)


def load_library(
    target: Path,
    build: Callable[[Path], None],
    accept: Callable[[ctypes.CDLL], None] = lambda library: None,
) -> tuple[ctypes.CDLL, bool]:
    """The library ``target`` in a trusted folder (:func:`private_folder`), verified and
    loaded; built first with ``build(output_path)`` when it is missing, and rebuilt once
    when it fails its digest, the load or ``accept`` (which raises :class:`LibraryError`).

    Returns the library and whether it was built. Errors of ``build`` propagate.
    """
    with _folder_locked(target.parent):
        first_problem = None
        if os.path.lexists(target):
            try:
                return _load_verified(target, accept), False
            except LibraryError as exc:
                first_problem = str(exc)
        _build_into(target, build)
        problem = folder_problem(target.parent)  # still ours after the build
        if problem is not None:
            raise LibraryError(f"not loading {target}: {problem}")
        try:
            return _load_verified(target, accept), True
        except LibraryError as exc:
            before = f" (before the rebuild: {first_problem})" if first_problem else ""
            raise LibraryError(f"{exc}, after a fresh build{before}") from None
