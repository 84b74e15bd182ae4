"""Folders of compiled native code (the CPU backend's library, the emulator's modules).

A cached library is native code loaded into the process, so it is guarded like
one: cache folders are created private to the user (0700), and a library is
loaded only from a folder and a file that the current user owns and nobody else
can write. A folder that fails the check is not used: the library is rebuilt in
a private temporary folder, with a warning that says why.

Builds write a temporary file in the folder and rename it into place, so two
processes building at once never load a partial file (the last rename wins,
with identical content).
"""

from __future__ import annotations

import os
import stat
import subprocess
import tempfile
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path

__all__ = ["cache_root", "compile_library", "private_folder", "trusted"]

_fallbacks: dict[Path, Path] = {}
_lock = threading.Lock()


def cache_root(kind: str) -> Path:
    """``$CUPYLARS_CACHE_DIR/<kind>``, else ``$XDG_CACHE_HOME`` or ``~/.cache``, ``/cupylars/<kind>``."""
    base = os.environ.get("CUPYLARS_CACHE_DIR")
    if base:
        return Path(base) / kind
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "cupylars" / kind


def _problem(path: Path, what: str) -> str | None:
    """Why ``path`` may not hold code we load (None: it may)."""
    try:
        info = os.lstat(path)
    except OSError as exc:
        return f"cannot inspect {path}: {exc}"
    if stat.S_ISLNK(info.st_mode):
        return f"{path} is a symbolic link"
    if what == "folder" and not stat.S_ISDIR(info.st_mode):
        return f"{path} is not a folder"
    if what == "file" and not stat.S_ISREG(info.st_mode):
        return f"{path} is not a regular file"
    if info.st_uid != os.getuid():
        return f"{path} belongs to uid {info.st_uid}, not to the current user ({os.getuid()})"
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"{path} can be written by others (mode {stat.filemode(info.st_mode)})"
    return None


def trusted(path: Path) -> bool:
    """Whether ``path`` is a regular file the current user owns and nobody else can write."""
    return _problem(path, "file") is None


def private_folder(folder: Path) -> Path:
    """``folder``, created 0700 if missing, if it is the user's and nobody else's to write;
    otherwise a private temporary folder for this process (with a warning)."""
    folder = Path(folder)
    with _lock:
        if folder in _fallbacks:
            return _fallbacks[folder]
        try:
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            problem = _problem(folder, "folder")
        except OSError as exc:
            problem = f"cannot create {folder}: {exc}"
        if problem is None:
            return folder
        fallback = Path(tempfile.mkdtemp(prefix="cupylars-"))  # 0700, owned by us
        warnings.warn(
            f"cupylars: not using the cache folder {folder} ({problem}); compiled code goes to the "
            f"private folder {fallback} for this process. Fix the folder's owner and mode, or set "
            "CUPYLARS_CACHE_DIR to a folder of your own.",
            RuntimeWarning,
            stacklevel=3,
        )
        _fallbacks[folder] = fallback
        return fallback


def compile_library(command: Sequence[str], source: str, folder: Path, target: Path) -> str | None:
    """Compile ``source`` (C++ text) with ``command`` (compiler and flags) into ``target``.

    Returns None on success, else the compiler's output. The library is written
    under a temporary name in ``folder``, made private, and renamed into place.
    """
    with tempfile.NamedTemporaryFile("w", dir=folder, suffix=".cpp", delete=False) as handle:
        handle.write(source)
    fd, partial = tempfile.mkstemp(dir=folder, suffix=".so.tmp")
    os.close(fd)
    try:
        result = subprocess.run([*command, handle.name, "-o", partial], capture_output=True, text=True)
        if result.returncode != 0:
            return (result.stdout + result.stderr).strip() or f"exit status {result.returncode}"
        os.chmod(partial, 0o700)  # the linker's mode follows the umask; nobody else may write it
        os.replace(partial, target)
        return None
    finally:
        for leftover in (partial, handle.name):
            if os.path.exists(leftover):
                os.unlink(leftover)
