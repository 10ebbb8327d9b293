"""One long-lived ``lvm`` process in shell mode, running commands one at a time.

Starting an LVM process costs more than most commands do (loading the
config, building the device cache); ``lvm`` reading commands on stdin
pays that once. With LVM_REPORT_FD set and the xtnd-shell profile
(sysdir.py) every command writes one JSON document to that fd: its
reports, then a log whose entry of context "shell" and type "status"
carries the command's exit code (LVM's ECMD_PROCESSED, 1, is success;
other codes are the process exit codes). After a failure, ``lastlog``
gives the messages the command logged (what a process prints on stderr).

LVM does not keep metadata between shell commands: each one scans its
devices and reads the metadata again, so changes made by other processes
or hosts show in the next command (tests/lvm/test_shell.py proves it).

Commands are serialized by a lock. A command that does not finish within
its timeout gets the process killed (SIGKILL also ends a stopped process);
a process that died is seen as EOF. Either way the command fails with
ShellError (an LVMError) and the next command starts a new process.

The process is a registered child (xtnd.common.cmd.CHILDREN) like every
command's, and is started from a dedicated thread, because its death signal
(setpriv --pdeathsig, see xtnd.common.cmd) fires when the *thread* that
started it exits, and callers may be short-lived threads.

A command may name the system directory of the process to run it
(Runner.shell_argv: the runner's settings are in files there instead of
``--config`` on every line): the shell keeps one process per directory.
LVM 2.03.16 crashes on the third command given ``--devices`` without
``--config``; the runner's shell commands have neither.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import os
import select
import subprocess
import threading
import time
from collections.abc import Sequence
from typing import Any

from xtnd.common import cmd

from . import sysdir
from .errors import LVMError

log = logging.getLogger("xtnd.lvm")

# ECMD_PROCESSED: the value LVM's command log reports for success.
_PROCESSED = 1
_READ_SIZE = 65536
_OUT_TAIL = 4096


class ShellError(LVMError):
    """The shell process timed out, died or spoke nonsense; it is restarted."""


@dataclasses.dataclass(frozen=True)
class ShellResult:
    rc: int  # as a process would exit: 0 on success
    report: list[dict[str, Any]]  # the document's "report" list (empty for non-report commands)
    out: str  # whatever the process wrote on stdout/stderr meanwhile
    err: str  # messages of a failed command (from lastlog)


def quote(arg: str) -> str:
    """arg as one word of an LVM shell line (LVM splits on blanks and honours quotes)."""
    if any(ch in arg for ch in "\n\r\0") or any(ord(ch) < 32 and ch != "\t" for ch in arg):
        raise ValueError(f"control character in LVM shell argument {arg!r}")
    if arg and not any(ch in arg for ch in " \t'\""):
        return arg
    if "'" not in arg:
        return f"'{arg}'"
    if '"' not in arg:
        return f'"{arg}"'
    raise ValueError(f"LVM shell argument with both quote characters: {arg!r}")


class _Process:
    """One running ``lvm`` shell and its pipes."""

    def __init__(self, proc: subprocess.Popen[bytes], report_fd: int, child: cmd.Child):
        self.proc = proc
        self.report_fd = report_fd
        self.child = child
        assert proc.stdin is not None and proc.stdout is not None
        self.stdin = proc.stdin
        self.stdout_fd = proc.stdout.fileno()
        os.set_blocking(self.report_fd, False)
        os.set_blocking(self.stdout_fd, False)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def kill(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            rc = self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # unkillable (D state); leave it to the kernel
            rc = None
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                try:
                    f.close()
                except OSError:
                    pass
        os.close(self.report_fd)
        if rc is not None:
            cmd.CHILDREN.remove(self.child)
        return rc


class LvmShell:
    """Runs LVM commands through one ``lvm`` process kept alive between them.

    system_dir: the LVM system directory (sysdir.prepare()); lvm: the binary.
    """

    def __init__(self, name: str = "lvm-shell", system_dir: str | None = None, lvm: str = "lvm"):
        self.name = name
        self._system_dir = system_dir
        self._lvm = lvm
        self._lock = threading.Lock()
        # One process per system directory ("": the shell's own).
        self._procs: dict[str, _Process] = {}
        self._last: _Process | None = None
        self._closed = False
        # Starts processes (see the module docstring: death signal per thread).
        self._starter = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{name}-start")
        self.starts = 0
        self.commands = 0
        self.failures = 0  # timeouts and deaths

    @property
    def pid(self) -> int | None:
        """The process that ran (or runs) the last command."""
        proc = self._last
        return proc.pid if proc is not None else None

    def close(self) -> None:
        """Stop the process (it exits on EOF); later commands raise ShellError."""
        with self._lock:
            self._closed = True
            procs = list(self._procs.values())
            self._procs.clear()
        for proc in procs:
            try:
                proc.stdin.close()
                proc.proc.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                pass
            proc.kill()
        self._starter.shutdown(wait=False)

    def execute(self, argv: Sequence[str], timeout: float, system_dir: str | None = None) -> ShellResult:
        """Run one command (argv without the leading "lvm") in the process of
        system_dir (None: the shell's own); ShellError if the process times
        out or dies (it is then replaced)."""
        line = " ".join(quote(a) for a in argv) + "\n"
        if not argv:
            raise ValueError("empty LVM shell command")
        with self._lock:
            if self._closed:
                raise ShellError(argv, -1, "", "the LVM shell is closed")
            deadline = time.monotonic() + timeout
            key = system_dir or ""
            proc = self._procs.get(key)
            if proc is not None and proc.proc.poll() is not None:
                # Died between commands: no command was in flight, none fails.
                self._kill(proc)
                proc = None
            proc = proc or self._start(key)
            self._last = proc
            self.commands += 1
            try:
                doc, out = self._send(proc, line, deadline, argv)
                rc = _exit_code(doc, argv)
                err = ""
                if rc != 0:
                    last, more = self._send(proc, "lastlog\n", deadline, argv)
                    out += more
                    err = _messages(last)
            except ShellError:
                self._kill(proc)
                raise
            return ShellResult(rc, list(doc.get("report", [])), out, err)

    def _start(self, key: str) -> _Process:
        proc = self._starter.submit(self._popen, key).result()
        self._procs[key] = proc
        self.starts += 1
        log.info("lvm shell started name=%s pid=%d starts=%d", self.name, proc.pid, self.starts)
        return proc

    def _popen(self, key: str) -> _Process:
        system_dir = key or self._system_dir or sysdir.prepare()
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        env = dict(os.environ)
        env.update(
            LVM_SYSTEM_DIR=system_dir,
            LVM_COMMAND_PROFILE=sysdir.SHELL_PROFILE,
            LVM_REPORT_FD=str(write_fd),
            LVM_SUPPRESS_FD_WARNINGS="1",
            # The shell's line editor keeps a history file in $HOME.
            HOME=system_dir,
        )
        argv = [self._lvm]
        try:
            # Registered like run()'s children: a daemon giving up its right
            # to write kills and waits for this one too (cmd.CHILDREN).
            cmd.CHILDREN.check(argv)
            popen = subprocess.Popen(
                cmd.tied_argv(argv),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=env,
                pass_fds=(write_fd,),
            )
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        try:
            child = cmd.CHILDREN.add(popen, argv)
        except BaseException:
            popen.wait()
            os.close(read_fd)
            raise
        return _Process(popen, read_fd, child)

    def _kill(self, proc: _Process) -> None:
        self.failures += 1
        for key, running in list(self._procs.items()):
            if running is proc:
                del self._procs[key]
        rc = proc.kill()
        log.warning("lvm shell stopped name=%s pid=%d rc=%s (restarted at the next command)", self.name, proc.pid, rc)

    def _send(self, proc: _Process, line: str, deadline: float, argv: Sequence[str]) -> tuple[dict[str, Any], str]:
        """Write line; read until its JSON document is complete."""
        try:
            proc.stdin.write(line.encode())
            proc.stdin.flush()
        except OSError as e:
            raise ShellError(argv, -1, "", f"cannot write to the LVM shell (pid {proc.pid}): {e}") from None
        doc = bytearray()
        out = bytearray()
        fds = [proc.report_fd, proc.stdout_fd]
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ShellError(
                    argv, -9, _tail(out), f"LVM shell command timed out (pid {proc.pid} killed and restarted)"
                )
            ready, _, _ = select.select(fds, [], [], left)
            if proc.stdout_fd in ready:
                chunk = _read(proc.stdout_fd)
                if chunk:
                    out += chunk
                    del out[:-_OUT_TAIL]
            if proc.report_fd in ready:
                chunk = _read(proc.report_fd)
                if chunk == b"":
                    rc = proc.proc.poll()
                    raise ShellError(argv, -1, _tail(out), f"LVM shell (pid {proc.pid}) exited rc={rc}")
                if chunk:
                    doc += chunk
                    parsed = _complete(doc)
                    if parsed is not None:
                        more = _read(proc.stdout_fd)
                        return parsed, _tail(out + (more or b""))


def _read(fd: int) -> bytes | None:
    """A chunk, b"" at EOF, None if nothing is there right now."""
    try:
        return os.read(fd, _READ_SIZE)
    except BlockingIOError:
        return None


def _tail(data: bytes | bytearray) -> str:
    return bytes(data[-_OUT_TAIL:]).decode("utf-8", "replace")


def _complete(buf: bytearray) -> dict[str, Any] | None:
    """The document once buf holds all of it (it ends with its closing brace)."""
    text = bytes(buf).strip()
    if not text.endswith(b"}"):
        return None
    try:
        doc = json.loads(text)
    except ValueError:
        return None
    if not isinstance(doc, dict):
        raise ShellError([], -1, text[-400:].decode("utf-8", "replace"), "unexpected LVM shell report")
    return doc


def _exit_code(doc: dict[str, Any], argv: Sequence[str]) -> int:
    for entry in reversed(doc.get("log", [])):
        if entry.get("log_context") == "shell" and entry.get("log_type") == "status":
            try:
                code = int(entry["log_ret_code"])
            except (KeyError, ValueError):
                break
            return 0 if code == _PROCESSED else code
    raise ShellError(argv, -1, json.dumps(doc)[-400:], "LVM shell report without a command status")


def _messages(doc: dict[str, Any]) -> str:
    """The messages of lastlog's document, one a line, as a process's stderr."""
    lines = [e.get("log_message", "") for e in doc.get("log", []) if e.get("log_type") != "status"]
    return "\n".join(line for line in lines if line)
