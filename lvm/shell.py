"""One long-lived ``lvm`` process in shell mode, running commands one at a time.

Starting an LVM process costs more than most commands do (loading the
config, building the device cache); ``lvm`` reading commands on stdin
pays that once. With LVM_REPORT_FD set and the xtnd-shell profile
(sysdir.py) every command writes one JSON document to that fd: its
reports, then a log whose entry of context "shell" and type "status"
carries the command's exit code (LVM's ECMD_PROCESSED, 1, is success;
other codes are the process exit codes), and the command's error and
warning messages (what a process prints on stderr).

LVM does not keep metadata between shell commands: each one scans its
devices and reads the metadata again, so changes made by other processes
or hosts show in the next command (tests/lvm/test_shell.py proves it).

Commands are pipelined: each is written to stdin as soon as it is
submitted, and a reader thread per process hands the documents on the
report fd to the commands in the order they were written (LVM runs them
one at a time, in order), so LVM never waits for Python between two
commands. A command's timeout runs from when LVM starts it. A command that
does not finish in time gets the process killed (SIGKILL also ends a
stopped process); a process that died is seen as EOF. Either way the
command fails with ShellError (an LVMError), every command queued behind it
fails with a ShellError saying it was not run, and the next command starts
a new process.

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

import collections
import concurrent.futures
import dataclasses
import json
import logging
import os
import select
import subprocess
import threading
import time
from collections.abc import Hashable, Sequence
from typing import Any

from xtnd.common import cmd

from . import sysdir
from .errors import LVMError

log = logging.getLogger("xtnd.lvm")

# ECMD_PROCESSED: the value LVM's command log reports for success.
_PROCESSED = 1
_READ_SIZE = 65536
_OUT_TAIL = 4096
_DECODER = json.JSONDecoder()


class ShellError(LVMError):
    """The shell process timed out, died or spoke nonsense; it is restarted."""


@dataclasses.dataclass(frozen=True)
class ShellResult:
    rc: int  # as a process would exit: 0 on success
    report: list[dict[str, Any]]  # the document's "report" list (empty for non-report commands)
    out: str  # whatever the process wrote on stdout/stderr meanwhile
    err: str  # messages of a failed command (its document's log)


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


_Result = tuple[dict[str, Any], str]  # a command's document, and the process's output meanwhile


@dataclasses.dataclass
class _Pending:
    """A command written to the process, waiting for its document."""

    argv: Sequence[str]
    timeout: float
    future: concurrent.futures.Future[_Result]
    started: float = 0.0  # when it became the command LVM runs (its timeout runs from there)


class _Process:
    """One running ``lvm`` shell, its pipes, and the commands written to it.

    Its reader thread hands each document on the report fd to the oldest
    pending command (LVM runs them in order), enforces the running one's
    timeout, and owns the cleanup: it kills and reaps the process and closes
    the pipes when the process ends or must end.
    """

    def __init__(self, proc: subprocess.Popen[bytes], report_fd: int, child: cmd.Child, name: str):
        self.proc = proc
        self.report_fd = report_fd
        self.child = child
        assert proc.stdin is not None and proc.stdout is not None
        self.stdin = proc.stdin
        self.stdout_fd = proc.stdout.fileno()
        os.set_blocking(self.report_fd, False)
        os.set_blocking(self.stdout_fd, False)
        self.lock = threading.Lock()
        self.pending: collections.deque[_Pending] = collections.deque()
        self.dead = False
        self.stopping = False
        self.devices: Hashable = None  # as the caller saw them at the start
        # Time with at least one command written and not done (LVM busy or
        # about to be): with the wall time, how long LVM waited for Python.
        self.busy = 0.0
        self.reader = threading.Thread(target=self._read_loop, name=f"{name}-read-{proc.pid}", daemon=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def submit(self, argv: Sequence[str], line: str, timeout: float) -> concurrent.futures.Future[_Result]:
        """Write line; the future gets (document, output) or a ShellError."""
        pending = _Pending(argv, timeout, concurrent.futures.Future())
        with self.lock:
            if self.dead:
                raise ShellError(argv, -1, "", f"LVM shell command not run: the process (pid {self.pid}) failed")
            try:
                self.stdin.write(line.encode())
                self.stdin.flush()
            except OSError as e:
                raise ShellError(argv, -1, "", f"cannot write to the LVM shell (pid {self.pid}): {e}") from None
            if not self.pending:
                pending.started = time.monotonic()
            self.pending.append(pending)
        return pending.future

    def _read_loop(self) -> None:
        doc = bytearray()
        out = bytearray()
        fds = [self.report_fd, self.stdout_fd]
        failed: tuple[int, str] | None = None
        try:
            while failed is None:
                with self.lock:
                    head = self.pending[0] if self.pending else None
                # Idle: wake now and then anyway (a command written meanwhile
                # gets its deadline enforced within a second).
                wait = 1.0
                if head is not None:
                    wait = min(wait, head.started + head.timeout - time.monotonic())
                    if wait <= 0:
                        failed = (-9, f"LVM shell command timed out (pid {self.pid} killed and restarted)")
                        break
                ready, _, _ = select.select(fds, [], [], wait)
                if self.stdout_fd in ready:
                    chunk = _read(self.stdout_fd)
                    if chunk:
                        out += chunk
                        del out[:-_OUT_TAIL]
                if self.report_fd in ready:
                    chunk = _read(self.report_fd)
                    if chunk == b"":
                        failed = (-1, f"LVM shell (pid {self.pid}) exited rc={self.proc.poll()}")
                        break
                    if chunk:
                        doc += chunk
                        for parsed in _documents(doc):
                            more = _read(self.stdout_fd)
                            self._done(parsed, _tail(out + (more or b"")))
                            out.clear()
        except BaseException as e:  # noqa: BLE001 - no command may wait forever
            failed = (-1, f"LVM shell (pid {self.pid}) reader failed: {e!r}")
        self._fail_all(*failed, _tail(out))
        self._cleanup()

    def _done(self, parsed: dict[str, Any], out: str) -> None:
        with self.lock:
            if not self.pending:
                return  # not a command's (LVM's last document when it exits)
            pending = self.pending.popleft()
            now = time.monotonic()
            if self.pending:
                self.pending[0].started = now
            self.busy += now - pending.started
        pending.future.set_result((parsed, out))

    def _fail_all(self, rc: int, msg: str, out: str) -> None:
        """The running command fails with msg; those queued behind it were
        never started and fail each with their own ShellError."""
        with self.lock:
            self.dead = True
            pending, self.pending = list(self.pending), collections.deque()
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            # Gone before anyone hears of the failure.
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # unkillable (D state); leave it to the kernel
            pass
        for i, p in enumerate(pending):
            if i == 0:
                p.future.set_exception(ShellError(p.argv, rc, out, msg))
            else:
                p.future.set_exception(
                    ShellError(p.argv, -1, "", f"LVM shell command not run: the process failed before it ({msg})")
                )

    def _cleanup(self) -> None:
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
        if self.stopping:
            log.info("lvm shell stopped pid=%d rc=%s", self.pid, rc)
        else:
            log.warning("lvm shell stopped pid=%d rc=%s (restarted at the next command)", self.pid, rc)

    def retire(self) -> None:
        """EOF on stdin: LVM runs what was written, then exits (the reader cleans up)."""
        with self.lock:
            self.stopping = True
            try:
                self.stdin.close()
            except OSError:
                pass

    def stop(self, timeout: float) -> None:
        """End the process: EOF on its stdin, then SIGKILL after timeout."""
        self.retire()
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.reader.join(timeout=15)


class LvmShell:
    """Runs LVM commands through one ``lvm`` process kept alive between them.

    Commands from several threads are pipelined: each is written as soon as
    it is submitted, so LVM never waits for Python between two of them.

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
        self._busy_done = 0.0  # of processes gone

    @property
    def pid(self) -> int | None:
        """The process that ran (or runs) the last command."""
        proc = self._last
        return proc.pid if proc is not None else None

    @property
    def busy_seconds(self) -> float:
        """Time some command was running or queued in a process (all processes)."""
        with self._lock:
            return self._busy_done + sum(p.busy for p in self._procs.values())

    def close(self) -> None:
        """Stop the processes (they exit on EOF); later commands raise ShellError."""
        with self._lock:
            self._closed = True
            procs = list(self._procs.values())
            self._procs.clear()
        for proc in procs:
            proc.stop(timeout=5)
            self._busy_done += proc.busy
        self._starter.shutdown(wait=False)

    def execute(
        self, argv: Sequence[str], timeout: float, system_dir: str | None = None, devices: Hashable = None
    ) -> ShellResult:
        """Run one command (argv without the leading "lvm") in the process of
        system_dir (None: the shell's own); ShellError if the process times
        out or dies (it is then replaced) while this command runs or waits.

        devices: what the caller's device nodes are now (their numbers). LVM
        keeps a device found by name in its cache across shell commands and
        then fails on a node re-created with other numbers ("fstat failed:
        Has device name changed?"): a process that saw other values is
        retired (it ends once the commands written to it are done) and the
        command goes to a new one.
        """
        if not argv:
            raise ValueError("empty LVM shell command")
        line = " ".join(quote(a) for a in argv) + "\n"
        with self._lock:
            if self._closed:
                raise ShellError(argv, -1, "", "the LVM shell is closed")
            key = system_dir or ""
            proc = self._procs.get(key)
            if proc is not None and proc.devices != devices and not proc.dead:
                log.info("lvm shell devices changed name=%s pid=%d: starting a new process", self.name, proc.pid)
                del self._procs[key]
                self._busy_done += proc.busy
                proc.retire()
                proc = None
            if proc is not None and (proc.dead or proc.proc.poll() is not None):
                # Died between commands (or with others'): start a new one.
                self.failures += 1
                self._busy_done += proc.busy
                del self._procs[key]
                proc = None
            if proc is None:
                proc = self._start(key)
                proc.devices = devices
            self._last = proc
            future = proc.submit(argv, line, timeout)
            self.commands += 1  # written
        doc, out = future.result()
        rc = _exit_code(doc, argv)
        err = _messages(doc) if rc != 0 else ""
        return ShellResult(rc, list(doc.get("report", [])), out, err)

    def _start(self, key: str) -> _Process:
        proc = self._starter.submit(self._popen, key).result()
        self._procs[key] = proc
        proc.reader.start()
        self.starts += 1
        log.info("lvm shell started name=%s pid=%d starts=%d dir=%s", self.name, proc.pid, self.starts, key)
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
        return _Process(popen, read_fd, child, self.name)


def _read(fd: int) -> bytes | None:
    """A chunk, b"" at EOF, None if nothing is there right now."""
    try:
        return os.read(fd, _READ_SIZE)
    except BlockingIOError:
        return None


def _tail(data: bytes | bytearray) -> str:
    return bytes(data[-_OUT_TAIL:]).decode("utf-8", "replace")


def _documents(buf: bytearray) -> list[dict[str, Any]]:
    """The complete JSON documents at the start of buf, removed from it.

    An incomplete one stays for the next chunk; one that is complete but
    not an object raises ShellError.
    """
    docs: list[dict[str, Any]] = []
    text = bytes(buf).decode("utf-8", "replace")
    pos = 0
    while True:
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if pos >= len(text):
            break
        try:
            doc, end = _DECODER.raw_decode(text, pos)
        except ValueError:
            break  # not all there yet
        if not isinstance(doc, dict):
            raise ShellError([], -1, text[pos:end][-400:], "unexpected LVM shell report")
        docs.append(doc)
        pos = end
    if docs:
        del buf[: len(text[:pos].encode("utf-8", "replace"))]
    return docs


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
    """The messages in a command's document, one a line, as a process's stderr."""
    lines = [e.get("log_message", "") for e in doc.get("log", []) if e.get("log_type") != "status"]
    return "\n".join(line for line in lines if line)
