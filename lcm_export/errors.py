"""The two kinds of failure a caller sees, each as one line that says what is wrong.

- ``UserError``: bad input or environment (a flag, a file, a LoRA, a resolution, an argument of the
  Python API, an entry that must be rebuilt). The caller can fix it. The CLI prints
  ``error: <message>`` and exits with code 2; a server maps it to 400.
- ``DamagedEntry``: a ``UserError`` whose cause is an engine-store entry's own files (a manifest value out of
  range, a path leading out of the entry, a malformed adapter index): the CLI exits 2 like any bad input
  (rebuild the entry); a server answers 500, since its entry, not the request, is at fault.
- ``EngineError``: valid input, but an engine or the runtime failed (NaN/inf from an engine, an
  internal invariant broken). Not a ``UserError`` subclass, so ``except UserError`` never swallows
  it. The CLI prints ``error: <message>`` and exits with code 1; a server maps it to 500.

Anything else escaping the library is a bug (the CLI shows its traceback).
"""

EXIT_USER_ERROR = 2
EXIT_ENGINE_ERROR = 1


class UserError(Exception):
    """Bad input or environment (4xx). The CLI prints ``error: <message>`` and exits with code 2."""


class DamagedEntry(UserError):
    """An entry's own files are damaged or hostile (CLI: exit 2, like any ``UserError``; a server: 500, with the same
    one line)."""


class EngineError(Exception):
    """An engine or the runtime failed on valid input (5xx). The CLI prints ``error: <message>`` and
    exits with code 1. Deliberately not a ``UserError``."""
