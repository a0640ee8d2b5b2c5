"""One line on stderr for every failure, whatever the libraries print on the way.

A CLI command runs with the process's stderr (file descriptor 2, so native code too: OpenVINO's
frontends log through absl, ONNX Runtime and TensorRT through their own loggers) and ``sys.stderr``
spooled into memory (a temporary file where the OS has no memfd). Progress bars draw on the real
stderr (``console()``), only on a terminal, and erase themselves when they close. When the command ends:

- with an error (``UserError``, ``EngineError``, a signal): the spool is dropped, and the error is the
  only line the user sees;
- successfully: the spool is replayed (the libraries' progress bars left out), so warnings are not
  lost; with ``--quiet`` only lcm-export's own ``warning:`` lines are;
- with an unexpected exception (a bug): the spool is replayed before the traceback.

Standard library only (the lean runtime's ``generate`` uses it).
"""

from __future__ import annotations

import os
import re
import sys
import tempfile

_active: "Spool | None" = None


class Spool:
    """Redirect fd 2 and ``sys.stderr`` into a temporary file until ``stop()``; ``text`` then holds it."""

    def __init__(self):
        self.text = ""
        self._file = self._saved_fd = self._saved_stream = self._console = None

    def start(self) -> "Spool":
        global _active
        try:
            sys.stderr.flush()
            self._file = _spool_file()
            self._saved_fd = os.dup(2)
            os.dup2(self._file.fileno(), 2)
        except (OSError, ValueError, AttributeError):  # no fd 2, or no room for the spool: run unspooled
            self._close_quietly()
            return self
        self._saved_stream = sys.stderr
        sys.stderr = open(2, "w", closefd=False, errors="backslashreplace", buffering=1)
        _active = self
        return self

    @property
    def active(self) -> bool:
        return self._saved_fd is not None

    def console(self):
        """A text stream onto the real stderr (for progress bars)."""
        if self._console is None:
            self._console = open(os.dup(self._saved_fd), "w", errors="backslashreplace", buffering=1)
        return self._console

    def stop(self) -> str:
        """Put stderr back; return what was spooled (also in ``text``)."""
        global _active
        if not self.active:
            return self.text
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        sys.stderr = self._saved_stream
        os.dup2(self._saved_fd, 2)
        # the spool's sys.stderr stays open: a logging handler made meanwhile (Ray's) may hold it, and it
        # writes to fd 2, the real stderr again from here on
        self._file.seek(0)
        self.text = self._file.read().decode("utf-8", "replace")
        self._close_quietly()
        if _active is self:
            _active = None
        return self.text

    def _close_quietly(self) -> None:
        for f in (self._console, self._file):
            if f is not None:
                try:
                    f.close()
                except OSError:
                    pass
        if self._saved_fd is not None:
            os.close(self._saved_fd)
        self._file = self._saved_fd = self._console = None

    def __enter__(self) -> "Spool":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _spool_file():
    """Memory, where the OS offers it (Linux memfd: a full disk cannot make stderr fail), else a temp file."""
    if hasattr(os, "memfd_create"):
        try:
            return os.fdopen(os.memfd_create("lcm-export-stderr"), "w+b")
        except OSError:
            pass
    return tempfile.TemporaryFile()


def console():
    """Where progress bars draw: the real stderr, also while a command's stderr is spooled."""
    return _active.console() if _active is not None else sys.stderr


_BAR = re.compile(r"\d+%\|")  # a tqdm frame: "Loading weights: 100%|██████████| 8/8 [...]"


def replayable(text: str, quiet: bool) -> str:
    """What of a spool to show after the command returned: every line but the libraries' progress bars, or
    with ``quiet`` only lcm-export's own ``warning:`` and ``error:`` lines (``bench`` names its failed rows
    so before it exits 1)."""
    lines = [line.rsplit("\r", 1)[-1].rstrip() for line in text.split("\n")]
    lines = [l for l in lines if l and not _BAR.search(l) and (not quiet or l.startswith(("warning: ", "error: ")))]
    return "".join(l + "\n" for l in lines)


def release(quiet: bool = False) -> None:
    """End the active spool early and replay it (``serve``, once its flags are checked and before Ray
    starts processes, which would inherit the spool as their stderr)."""
    spool = _active
    if spool is not None:
        text = spool.stop()  # first: sys.stderr is the real one again only after this
        spool.text = ""  # shown once: the command's end has nothing left to replay
        sys.stderr.write(replayable(text, quiet))
