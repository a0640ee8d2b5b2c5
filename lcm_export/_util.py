"""Small shared helpers: hashing, atomic writes, JSON. No heavy imports."""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Iterator

from .confine import PARTIAL_RE, remove, stale, sweep_partials
from .errors import UserError


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file atomically (temp file in the same folder, then rename), mode 0666 & ~umask."""
    write_bytes(path, text.encode())


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write a file atomically (temp file in the same folder, then rename), mode 0666 & ~umask."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.partial-{os.getpid()}-", dir=path.parent)  # swept when we die
    try:
        os.chmod(tmp, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike, data) -> None:
    """Write JSON atomically (temp file in the same folder, then rename)."""
    write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def remove_stale_partials(final: Path) -> list[Path]:
    """Remove ``.NAME.partial-PID-*`` / ``.NAME.old-PID`` beside ``final`` whose owner process is gone (a build
    killed with SIGKILL, a power cut): that exact pattern only (``confine.PARTIAL_RE``), real folders and regular
    files only. Live owners' folders are left alone; an ``.old-PID`` whose process died between its two renames
    becomes ``final`` again when ``final`` is missing."""
    parent = final.parent
    if not parent.is_dir():
        return []
    if not os.path.lexists(final):
        for p in sorted(parent.iterdir()):
            if stale(p, final.name, ("old",)) and p.is_dir():
                os.replace(p, final)
                break
    return sweep_partials(parent, final.name, ("partial", "old"))


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, force: bool = False, what: str = "output folder",
               marker: str | None = None) -> Iterator[Path]:
    """Yield a temp folder beside ``final``; on success it replaces ``final`` in one rename.

    ``force`` replaces only what lcm-export wrote: an empty folder, or one holding the writer's ``marker`` file
    (a regular file, e.g. ``manifest.json``) when one is given; a symbolic link at ``final`` or any other folder
    is refused in one line, untouched. The folder replaced is removed as a real folder: links inside it are
    removed as links, never followed.

    On any error (and on SIGINT/SIGTERM, which the CLI turns into ``KeyboardInterrupt``) the temp
    folder is removed, so ``final`` is either absent, untouched, or complete. The temp folder's name
    carries this process's id; folders left by a process that died without cleaning up (SIGKILL)
    are removed by the next ``atomic_dir`` for the same ``final``.
    """
    final = Path(final)
    check_replaceable(final, what, marker)
    if final.exists() and not force:
        raise UserError(f"{what} {final} already exists; pass --force to replace it")
    made = [a for a in final.parents if not a.exists()]  # the folders it makes: removed again (when empty) if nothing is written
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(final)
    prefix = f".{final.name}.partial-{os.getpid()}-"
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    tmp = None
    try:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=final.parent))
        os.chmod(tmp, 0o777 & ~current_umask())
        yield tmp
        if final.exists():
            os.replace(final, old)
            os.replace(tmp, final)
            remove(old)
        else:
            os.replace(tmp, final)
    except BaseException:  # a signal between mkdtemp and the assignment leaves a folder ``tmp`` never named
        if old.exists() and not final.exists():  # interrupted between the two renames: the old entry comes back
            os.replace(old, final)
        for p in [tmp] if tmp is not None else final.parent.glob(glob.escape(prefix) + "*"):
            shutil.rmtree(p, ignore_errors=True)
        for a in made:  # nearest first
            with contextlib.suppress(OSError):
                a.rmdir()
        raise


def _regular(p: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(p).st_mode)
    except OSError:
        return False


def check_replaceable(final: Path, what: str = "output folder", marker: str | None = None) -> None:
    """Refuse, in one line, a ``final`` that ``atomic_dir`` must not replace: a file, a symbolic link (renaming
    would replace the link, not the folder it names), or a folder that is neither empty nor holds the writer's
    ``marker`` file (a regular file): lcm-export replaces only folders it wrote."""
    final = Path(final)
    if os.path.islink(final):
        raise UserError(f"{what} {final} is a symbolic link (to {os.path.realpath(final)}); lcm-export replaces a folder "
                        "by renaming, so pass the folder itself")
    check_dir_path(final, what)
    if marker is not None and final.is_dir() and not _regular(final / marker) and any(final.iterdir()):
        raise UserError(f"{what} {final} holds files lcm-export did not write (its {marker} is missing or not a regular "
                        "file), so it is not replaced, not even with --force; choose another folder, or empty it yourself")


def link_tree(src: Path, dst: Path, skip=lambda name: False) -> None:
    """Hard-link every regular file of ``src`` into ``dst`` (copy where links are impossible); files whose name
    ``skip`` accepts, symbolic links, special files (FIFOs, devices) and leftovers of interrupted writes
    (``confine.PARTIAL_RE``) are left out, and links to folders are not descended: only what lcm-export wrote."""
    for root, dirs, files in os.walk(src):
        dirs[:] = [d for d in dirs if not PARTIAL_RE.fullmatch(d) and not os.path.islink(Path(root) / d)]
        rel = Path(root).relative_to(src)
        (Path(dst) / rel).mkdir(parents=True, exist_ok=True)
        for f in files:
            if skip(f) or PARTIAL_RE.fullmatch(f) or not _regular(Path(root) / f):
                continue
            try:
                os.link(Path(root) / f, Path(dst) / rel / f, follow_symlinks=False)
            except OSError:
                shutil.copy2(Path(root) / f, Path(dst) / rel / f, follow_symlinks=False)


def file_parent(path: Path) -> Path | None:
    """The nearest existing ancestor of ``path`` when it is a file (``path`` cannot be created), else None."""
    for parent in Path(path).parents:
        if parent.exists():
            return None if parent.is_dir() else parent
    return None


def check_dir_path(path: Path, what: str = "output folder") -> None:
    """Refuse, as one line, a folder path that names a file or lies under a file."""
    if path.exists() and not path.is_dir():
        raise UserError(f"{what} {path} is a file, not a folder; choose a folder path")
    parent = file_parent(path)
    if parent is not None:
        raise UserError(f"{what} {path}: {parent} is a file, not a folder; choose another path")


class Terminated(KeyboardInterrupt):
    """SIGTERM (or SIGHUP) as an exception, so every ``atomic_dir`` cleans up as it does for Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def termination_as_interrupt() -> Iterator[None]:
    """The one signal handler: while active, SIGTERM and SIGHUP raise ``Terminated`` in the main
    thread (cleanup runs as for SIGINT). A no-op outside the main thread."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated(signum)

    sigs = [s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None)) if s is not None]
    previous = {s: signal.signal(s, handler) for s in sigs}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def final_path(where: str | os.PathLike) -> Path:
    """``where`` with a ``.NAME.partial-PID-*`` folder (``atomic_dir``'s temp folder) replaced by the
    ``NAME`` it becomes: the path the user asked for, not ours."""
    parts = list(Path(where).parts)
    for i, part in enumerate(parts):
        if part.startswith(".") and ".partial-" in part:
            parts[i] = part[1:part.index(".partial-")]
    return Path(*parts) if parts else Path(where)


_FULL_BYTES = 1 << 20
"""A filesystem with less free space than this after a failed write is taken to be full."""
_WRITE_WORDS = ("no space", "disk quota", "iostream", "write", "serializ", "save")
"""Words of libraries' own write-failure messages (OpenVINO: "basic_ios::clear: iostream error"; ONNX
Runtime: "Protobuf serialization failed")."""


def free_bytes(where: str | os.PathLike) -> int | None:
    """Free bytes on the filesystem that holds ``where`` (its nearest existing ancestor)."""
    p = Path(where)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        st = os.statvfs(p)
    except (OSError, AttributeError):
        return None
    return st.f_bavail * st.f_frsize


def no_space_left(exc: BaseException) -> bool:
    """Whether an exception says the disk is full (errno 28, or a library's words for it)."""
    import errno

    return getattr(exc, "errno", None) == errno.ENOSPC or any(
        w in str(exc).lower() for w in ("no space left", "os error 28", "errno 28"))


def disk_error(exc: BaseException, where: str | os.PathLike, need: int = 0) -> UserError:
    """Turn a failed write of ``where`` (an OSError, or a library's own exception) into a one-line user
    error. A library's exception counts as a full disk when less than ``need`` bytes (what the write
    needed, where known) or 1 MiB are free."""
    import errno

    code = getattr(exc, "errno", None)
    if code is None:
        free = free_bytes(where)
        code = errno.ENOSPC if no_space_left(exc) or (free is not None and free < max(_FULL_BYTES, need)) else None
    where = final_path(where)
    if code == errno.ENOSPC:
        return UserError(f"no space left on device while writing {where}; free disk space or choose another --out/--engine-dir")
    if code == errno.EDQUOT:
        return UserError(f"disk quota exceeded while writing {where}; free space or choose another --out/--engine-dir")
    text = getattr(exc, "strerror", None) or (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
    return UserError(f"could not write {where}: {text}; check free space and permissions, or choose another --out/--engine-dir")


def is_write_failure(exc: BaseException, where: str | os.PathLike, need: int = 0) -> bool:
    """Whether a library's exception from a call that writes ``where`` is a failed write: an OSError, the
    filesystem (nearly) full, or the library's message saying a write failed."""
    if isinstance(exc, OSError):
        return True
    free = free_bytes(where)
    if free is not None and free < max(_FULL_BYTES, need):
        return True
    text = str(exc).lower()
    return any(w in text for w in _WRITE_WORDS)


@contextlib.contextmanager
def writing(where: str | os.PathLike, need: int = 0) -> Iterator[None]:
    """Around every call that writes a file (ours or a library's): a failed write becomes the one-line
    disk error (``disk_error``) whatever the library raises — OSError from Python, RuntimeError
    ("basic_ios::clear: iostream error") from OpenVINO, InvalidProtobuf ("Protobuf serialization
    failed") from ONNX Runtime. ``need``: about how many bytes the write takes, where known. Anything
    else propagates unchanged."""
    try:
        yield
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - classified below; the rest is re-raised as it was
        if is_write_failure(exc, where, need):
            raise disk_error(exc, where, need) from None
        raise


def folder_bytes(path: str | os.PathLike) -> int:
    """The size of the files in ``path``'s folder (a graph and the data files beside it)."""
    return sum(f.stat().st_size for f in Path(path).parent.iterdir() if f.is_file())


def tool_versions(*extra: str) -> dict[str, str]:
    """Installed versions of the tools that shape an artifact (from package metadata; no imports)."""
    from importlib import metadata

    from . import __version__

    names = ("torch", "diffusers", "transformers", "peft", "onnx", "onnxruntime", "onnxruntime-gpu") + extra
    out = {"lcm_export": __version__}
    for n in names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            pass
    return out


def progress(total: int, desc: str, enabled: bool = True):
    """A tqdm bar on the real stderr (``_stderr.console()``: also while a command's stderr is spooled),
    drawn on a terminal only and erased when it closes, so that an error after it is the one line left
    (a no-op stand-in when tqdm is missing, progress is off or stderr is not a terminal)."""
    from ._stderr import console

    out = console()
    try:
        from tqdm.auto import tqdm

        enabled = enabled and out.isatty()
    except (ImportError, AttributeError, ValueError):  # tqdm ships with the build extra
        enabled = False
    if not enabled:
        class _Null:
            def update(self, n=1): ...
            def set_description_str(self, s): ...
            def close(self): ...
            def __enter__(self): return self
            def __exit__(self, *a): ...
        return _Null()
    return tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True, leave=False, file=out)
