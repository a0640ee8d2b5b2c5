"""An entry is a sealed room: the one rule for every path read from an entry and every delete in it.

An entry is a folder people copy, download and share, so its files are untrusted input, like a LoRA file.

- **Reads.** A path that comes from an entry's own files (its manifest, its adapter index) is a plain relative
  path (not absolute, no ``..``, no empty or NUL parts) whose real path, every symbolic link followed, stays inside
  the entry's real path, and names a regular file or folder (not a FIFO, socket or device, which can block a
  reader forever). :func:`problem` says what is wrong with one; :func:`inside` returns it or refuses in one line.
  Hard links are allowed: reading one reads only its bytes (checked like any file's), and lcm-export never writes
  through a file (every write is a new file renamed over the old one), so no file outside an entry changes.
- **Deletes.** A folder is deleted only when its path matches the exact layout lcm-export's writer makes
  (:func:`owned_dir`: a pattern, matched whole) and it and every folder between it and the entry are real
  folders, not symbolic links. ``shutil.rmtree`` of a real folder removes links inside it as links, never
  following them.
- **Leftovers.** A write interrupted by SIGKILL or a power cut leaves ``.NAME.partial-PID[-RANDOM]`` (a folder or
  a temp file) or ``.NAME.old-PID``; :func:`sweep_partials` removes those of processes that are gone, matching
  that exact pattern only, real folders and regular files only.

Standard library and ``errors`` only: the store, the adapter index, the runtime and the backends all call it.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
from pathlib import Path, PurePosixPath

from .errors import DamagedEntry

PARTIAL_RE = re.compile(r"\.(?P<name>[^/\n]+)\.(?P<kind>partial|old)-(?P<pid>[0-9]{1,10})(?:-[A-Za-z0-9_]{1,32})?")
"""What lcm-export's interrupted writes leave: ``.NAME.partial-PID`` (adapter add), ``.NAME.partial-PID-RANDOM``
(a temp folder or file of an atomic write), ``.NAME.old-PID`` (an entry being replaced). Matched whole."""


def _real(p: str | os.PathLike) -> str:
    return os.path.realpath(os.fspath(p))


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def problem(root: str | os.PathLike, rel) -> str | None:
    """What is wrong with ``rel`` as a path inside the entry ``root`` (None when nothing): the words follow the
    path's name in a message ("unet/model.onnx <problem>")."""
    if not isinstance(rel, str) or not rel or "\0" in rel:
        return "is not a path"
    parts = PurePosixPath(rel).parts
    if PurePosixPath(rel).is_absolute() or os.path.isabs(rel):
        return "is an absolute path (an entry's paths are relative to its folder)"
    if ".." in parts:
        return "leaves the entry's folder ('..')"
    top = _real(root)
    target = _real(Path(root, rel))
    if not _within(target, top):
        return f"leads outside the entry's folder (a symbolic link to {target})"
    try:
        mode = os.stat(target).st_mode
    except OSError:
        return None  # missing: the caller's own check says so
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        return "is not a regular file (a FIFO, socket or device)"
    return None


def inside(root: str | os.PathLike, rel, what: str, fix: str = "") -> Path:
    """``root / rel`` when it stays inside the entry ``root`` (:func:`problem`); else a one-line DamagedEntry that
    starts with ``what`` (the file that named ``rel``) and ends with ``fix``."""
    why = problem(root, rel)
    if why is not None:
        raise DamagedEntry(f"{what}: damaged entry: {rel!r} {why}" + (f"; {fix}" if fix else ""))
    return Path(root, rel)


def owned_dir(root: str | os.PathLike, rel: str, layout: re.Pattern, what: str) -> Path | None:
    """The folder ``root / rel`` to delete, when ``rel`` matches ``layout`` whole and it and every folder above it
    up to ``root`` are real folders (not symbolic links) inside ``root``; None when it does not exist. A one-line
    DamagedEntry (naming ``what``) for anything else: lcm-export deletes only what its writer made."""
    refused = f"{what}: {rel!r} is not a folder lcm-export wrote; nothing was deleted (remove it yourself if it is yours)"
    if not isinstance(rel, str) or not layout.fullmatch(rel) or ".." in PurePosixPath(rel).parts:
        raise DamagedEntry(refused)
    p = Path(root)
    for part in PurePosixPath(rel).parts:
        p = p / part
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            return None
        if not stat.S_ISDIR(st.st_mode):
            kind = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a folder"
            raise DamagedEntry(f"{what}: {p} is {kind}, not a folder lcm-export wrote; nothing was deleted (remove it "
                               "yourself if it is yours)")
    if problem(root, rel) is not None:  # a folder above it is a link out of the entry
        raise DamagedEntry(refused)
    return p


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (another user's counts)."""
    if pid <= 0:
        return True  # never ours to judge
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def stale(path: Path, name: str | None = None, kinds=("partial", "old")) -> bool:
    """Whether ``path`` is a leftover of a gone process (:data:`PARTIAL_RE`, of ``name`` when given): a real folder
    or a regular file (never a link) whose process is not alive and not this one."""
    m = PARTIAL_RE.fullmatch(path.name)
    if m is None or m["kind"] not in kinds or (name is not None and m["name"] != name):
        return False
    pid = int(m["pid"])
    if pid == os.getpid() or pid_alive(pid):
        return False
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return False
    return stat.S_ISDIR(mode) or stat.S_ISREG(mode)


def remove(path: Path) -> None:
    """Remove a real folder (links inside it removed as links) or a regular file; never follows a link."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISDIR(mode):
        shutil.rmtree(path, ignore_errors=True)
    elif stat.S_ISREG(mode):
        try:
            os.unlink(path)
        except OSError:
            pass


def sweep_partials(folder: str | os.PathLike, name: str | None = None, kinds=("partial",)) -> list[Path]:
    """Remove the leftovers (:func:`stale`) directly in ``folder`` (of ``name`` when given); return them. A folder
    that is missing, not a real folder, or unreadable is left alone."""
    folder = Path(folder)
    try:
        if not stat.S_ISDIR(os.lstat(folder).st_mode):
            return []
        names = os.listdir(folder)
    except OSError:
        return []
    out = []
    for n in names:
        p = folder / n
        if stale(p, name, kinds):
            remove(p)
            out.append(p)
    return out
