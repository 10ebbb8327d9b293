"""One line for an operator from any error a command meets.

Typed errors already say what and where (file, domain, device, socket);
this only shortens the ones that carry detail an operator does not need on
the terminal: an LVM failure's command line and full stderr, a command's
argv. The full exception, traceback included, goes to the log at debug
level (``xtnd -vv`` shows it).
"""

from __future__ import annotations

import logging

from xtnd import lvm
from xtnd.common.cmd import CommandError, CommandTimeout

log = logging.getLogger("xtnd.tools")


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def describe(e: BaseException) -> str:
    """What went wrong, where, in one line."""
    if isinstance(e, lvm.NotEnoughFreeExtents | lvm.VGNotFound | lvm.LVNotFound):
        return e.msg
    if isinstance(e, lvm.LVMError):
        why = _last_line(e.err)
        sub = e.cmd[1] if len(e.cmd) > 1 else "lvm"
        return f"{e.msg} ({sub}): {why}" if why else f"{e.msg} ({sub}, exit code {e.rc})"
    if isinstance(e, CommandTimeout):
        return f"{e.cmd[0] if e.cmd else 'command'} did not finish in {e.timeout:g}s and was killed"
    if isinstance(e, CommandError):
        name = e.cmd[0] if e.cmd else "command"
        why = _last_line(e.err.decode("utf-8", "replace"))
        return f"{name} failed (exit code {e.rc})" + (f": {why}" if why else "")
    if isinstance(e, OSError):
        where = " ".join(repr(f) for f in (e.filename, e.filename2) if f is not None)
        what = e.strerror or str(e) or type(e).__name__
        return f"{where}: {what}" if where else what
    text = " ".join(str(e).split())
    if not type(e).__module__.startswith("xtnd."):
        # Not typed for operators: a bug or an unexpected input; name the class.
        return f"{type(e).__name__}: {text}" if text else type(e).__name__
    return text or type(e).__name__


def report(prog: str, e: BaseException) -> str:
    """Log e with its traceback at debug; the line to print on stderr."""
    log.debug("%s failed", prog, exc_info=e)
    return f"{prog}: error: {describe(e)}"
