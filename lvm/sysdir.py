"""xtnd's own LVM system directory (LVM_SYSTEM_DIR): the host's config plus two settings.

Every LVM command xtnd runs (process or shell) reads its configuration from
here instead of /etc/lvm:

- lvm.conf is the host's without its comment lines: the same settings,
  but a shell parses it again for every command (``--config`` makes LVM
  reload its configuration), and Debian's is ~110 KB of comments;
- lvmlocal.conf is the host's (also without comments) plus
  ``global { use_aio = 0 }``. LVM reads
  devices through a Linux AIO context and destroys it at the end of every
  command; io_destroy(2) waits for an RCU grace period, which on a busy
  2-core host is 30-50 ms: most of an lvextend. Synchronous O_DIRECT I/O
  does the same reads and writes without it. The setting is only read from
  the config files (``--config`` is applied too late for it); and
  ``shell { history_size = 0 }``: the LVM shell (shell.py) otherwise
  rewrites its line-editor history ($HOME/.lvm_history, the last 100
  command lines, ~30 KB converted character by character) after every
  command: ~0.7 ms of CPU of an lvextend's ~4 ms here (perf, strace);
- profile/xtnd-shell.profile: the report settings of the LVM shell
  (shell.py): JSON reports in bytes and a command log whose "shell"
  status entry carries each command's exit code, with its errors.

dev/<key>/ holds one symbolic link per PV of a runner's device list (key:
a hash of the list). The runner points LVM's device scan at it
(``devices/scan``): otherwise LVM stats every node under /dev in every
command even with ``--devices`` (hundreds of loop devices here; SCSI paths
and dm nodes on a SAN host). Links, not device nodes: a link follows a
multipath node that was re-created with another major:minor.

v/<key>/ is a system directory of its own per set of runner settings (the
runner's config text, its scan directory included): the host's config plus
those settings, for the LVM shell. A shell command given ``--config``
makes LVM reload and re-parse all of its configuration, every command;
with the settings in the files it reads them once per process.

Paths LVM derives from the system directory are pinned back to the host's
(metadata backups and archives, when enabled) by the runner's --config.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Sequence

HOST_DIR = "/etc/lvm"
DEFAULT_DIR = "/run/xtnd/lvm"
SHELL_PROFILE = "xtnd-shell"

_LOCAL_SETTINGS = """
# Added by xtnd: synchronous I/O (no AIO context to destroy per command).
global {
\tuse_aio = 0
}
# Added by xtnd: the LVM shell keeps no command history (rewritten per command).
shell {
\thistory_size = 0
}
"""

_PROFILE = """# Written by xtnd for its LVM shell; rewritten at every start.
global {
\tunits = "b"
\tsuffix = 0
}
report {
\toutput_format = "json"
\tcompact_output = 0
\tbinary_values_as_numeric = 0
}
log {
\t# One JSON document per command on LVM_REPORT_FD; its log lists the
\t# shell's status entry (the command's exit code) and the command's
\t# errors and warnings (what a process prints on stderr).
\treport_command_log = 1
\tcommand_log_selection = "log_context=shell || log_type=error || log_type=warn"
\tcommand_log_cols = "log_seq_num,log_type,log_context,log_object_name,log_message,log_ret_code"
\tcommand_log_sort = "log_seq_num"
}
"""

_lock = threading.Lock()


def _replace(path: str, data: str) -> None:
    """Write path atomically (other processes may read it at any time)."""
    tmp = f"{path}.tmp.{os.getpid()}.{threading.get_ident()}"
    with open(tmp, "w") as f:
        f.write(data)
    os.rename(tmp, path)


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return ""


def settings(text: str) -> str:
    """An LVM config file without its comment and blank lines.

    Only whole lines starting with '#' go: a '#' after a setting may be
    inside a quoted string (a filter regex), so those lines are kept whole.
    """
    lines = [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return "".join(line + "\n" for line in lines)


def prepare(path: str = DEFAULT_DIR, host_dir: str = HOST_DIR, extra: str = "") -> str:
    """Create or update the directory at path; return path.

    extra: more settings for its lvmlocal.conf (LVM config syntax).

    Cheap and idempotent: done once per runner or shell, and again whenever
    a process (re)starts, so a host config change is picked up.
    """
    with _lock:
        os.makedirs(os.path.join(path, "profile"), mode=0o755, exist_ok=True)
        conf = settings(_read(os.path.join(host_dir, "lvm.conf")))
        if _read(os.path.join(path, "lvm.conf")) != conf:
            _replace(os.path.join(path, "lvm.conf"), conf)
        local = settings(_read(os.path.join(host_dir, "lvmlocal.conf"))) + _LOCAL_SETTINGS
        if extra:
            local += f"# Added by xtnd: the runner's settings.\n{extra}\n"
        if _read(os.path.join(path, "lvmlocal.conf")) != local:
            _replace(os.path.join(path, "lvmlocal.conf"), local)
        profile = os.path.join(path, "profile", f"{SHELL_PROFILE}.profile")
        if _read(profile) != _PROFILE:
            _replace(profile, _PROFILE)
    return path


def device_dir(devices: Sequence[str], path: str = DEFAULT_DIR) -> tuple[str, tuple[str, ...]]:
    """The scan directory of a device list and its links (in the list's order).

    Creates the directory and its links if missing and re-points a link whose
    target differs (cheap: one readlink per device when nothing changed).
    """
    key = hashlib.sha256("\0".join(devices).encode()).hexdigest()[:16]
    dirpath = os.path.join(path, "dev", key)
    links = tuple(os.path.join(dirpath, f"pv{i}") for i in range(len(devices)))
    for link, device in zip(links, devices, strict=True):
        try:
            if os.readlink(link) == device:
                continue
        except FileNotFoundError:
            os.makedirs(dirpath, mode=0o755, exist_ok=True)
        except OSError:
            pass
        with _lock:
            tmp = f"{link}.tmp.{os.getpid()}.{threading.get_ident()}"
            os.symlink(device, tmp)
            os.rename(tmp, link)
    return dirpath, links


def variant(config: str, path: str = DEFAULT_DIR, host_dir: str = HOST_DIR) -> str:
    """The system directory under path for a runner's config (LVM syntax, one
    line is fine): the host's config plus config; created or updated."""
    key = hashlib.sha256(config.encode()).hexdigest()[:16]
    return prepare(os.path.join(path, "v", key), host_dir, extra=config)
