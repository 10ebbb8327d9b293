"""Operator mistakes through the real ``xtnd`` command: one line, never a traceback.

Each row runs the installed entry point (a subprocess) the way an operator
would and checks a non-zero exit, no "Traceback", one line on stderr (argparse
usage errors excepted: they print usage first) and the key fact named. All
rows share one small block domain on a loop PV (storage.json forces loop
activation, so this runs with or without device-mapper).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator

import pytest
from xtnd.tools.rig import loops

XTND = os.path.join(os.path.dirname(sys.executable), "xtnd")
MiB = 1024**2


@dataclasses.dataclass
class Rig:
    dir: str
    storage: str
    domain: str
    volume: str
    pv: str


@pytest.fixture(scope="module")
def rig() -> Iterator[Rig]:
    if not loops.is_root():
        pytest.skip("needs root (loop devices, LVM)")
    path = loops.workdir("mistakes")
    storage = os.path.join(path, "storage.json")
    with open(storage, "w") as f:
        json.dump({"activation": "loop", "domains": {}}, f)
    try:
        with loops.loop_pvs(path, count=1, size=512 * MiB) as [pv]:
            sd, vol = str(uuid.uuid4()), str(uuid.uuid4())
            env = {**os.environ, "XTND_SPM_SOCKET": os.path.join(path, "no-spm.sock")}
            for argv in (
                ["domain", "create", "--uuid", sd, "--pv", pv, "--master", "--extent-size", "4M"],
                # --local: bootstrap, no sanlock daemon for this rig.
                ["volume", "create", "--domain", sd, "--uuid", vol, "--capacity", "64M", "--initial-size", "8M"]
                + ["--local"],
            ):
                subprocess.run([XTND, *argv, "--storage-config", storage], check=True, capture_output=True, env=env)
            yield Rig(path, storage, sd, vol, pv)
            vg = ["--devices", pv]
            subprocess.run(["vgremove", "-f", *vg, sd], capture_output=True)
    finally:
        shutil.rmtree(path, ignore_errors=True)


def write(path: str, text: str) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    return path


def mistakes(r: Rig) -> list[tuple[str, list[str], list[str], dict[str, str]]]:
    """(name, argv, facts the one line must name, extra env).

    Volume creates run with --local: no sanlock daemon here to take the SPM
    lease with (tests/storage/test_spmowner.py covers that)."""
    d = r.dir
    master = r.domain
    other = str(uuid.uuid4())
    good_spm = f"[spm]\nhost_id = 1\nmaster_domain = {master}\nstorage_config = {r.storage}\n"
    good_hsm = f"[host]\nhost_id = 2\nmaster_domain = {master}\nstorage_config = {r.storage}\n"
    spm_missing = os.path.join(d, "nope", "spm.conf")
    spm_bad_uuid = write(f"{d}/c1/spm.conf", "[spm]\nhost_id = 1\nmaster_domain = abc\n")
    hsm_negative = write(f"{d}/c2/hsm.conf", good_hsm + "[monitor]\nstats_interval = -2   # typo\n")
    spm_section = write(f"{d}/c3/spm.conf", good_spm + "[leases]\nio_timeout = 10\n")
    spm_dropin = write(f"{d}/c4/spm.conf", good_spm)
    os.makedirs(spm_dropin + ".d/50-local.conf", exist_ok=True)  # a drop-in that cannot be read
    hsm_not_ini = write(f"{d}/c5/hsm.conf", "host_id = 2\n")
    spm_alloc = write(f"{d}/c6/spm.conf", good_spm + "[lvm]\nalloc = contigous\n")
    bad_json = write(f"{d}/s1/storage.json", '{"domains": {')
    bad_entry = write(f"{d}/s2/storage.json", json.dumps({"domains": {"sd1": {"pvs": ["/dev/x"]}}}))
    no_master = write(f"{d}/s3/storage.json", json.dumps({"activation": "loop", "domains": {}}))
    hsm_bad_storage = write(
        f"{d}/c8/hsm.conf",
        good_hsm.replace(r.storage, bad_json) + "control_socket =\n[metrics]\nlisten =\n",
    )
    spm_no_master = write(
        f"{d}/c7/spm.conf",
        f"[spm]\nhost_id = 1\nmaster_domain = {other}\nstorage_config = {no_master}\ncontrol_socket =\n"
        "[metrics]\nlisten =\n",
    )
    stale = os.path.join(d, "stale.sock")
    if not os.path.exists(stale):
        s = socket.socket(socket.AF_UNIX)
        s.bind(stale)
        s.close()  # bound, never listened on: what a killed daemon leaves
    unreadable = os.path.join(d, "unreadable-inbox")
    write(unreadable, "")
    os.chmod(unreadable, 0o600)
    st = ["--storage-config", r.storage]
    vol = ["--domain", master, "--uuid", r.volume]
    new = ["--domain", master, "--uuid", str(uuid.uuid4())]
    return [
        ("missing spm config", ["spm", "--config", spm_missing], [spm_missing, "no such config file"], {}),
        ("bad master UUID", ["spm", "--config", spm_bad_uuid], ["master_domain = 'abc'", "not a UUID"], {}),
        ("negative interval", ["hsm", "--config", hsm_negative, "--check-config"], ["[monitor] stats_interval"], {}),
        ("unknown section", ["spm", "--config", spm_section, "--check-config"], ["[leases]", "unknown section"], {}),
        ("unreadable drop-in", ["spm", "--config", spm_dropin], ["50-local.conf", "cannot read"], {}),
        ("not INI", ["hsm", "--config", hsm_not_ini, "--check-config"], [hsm_not_ini, "before any [section]"], {}),
        ("bad choice", ["spm", "--config", spm_alloc, "--check-config"], ["alloc = 'contigous'", "one of"], {}),
        (
            "storage.json not JSON",
            ["domain", "info", "--uuid", master, "--storage-config", bad_json],
            [bad_json, "not JSON"],
            {},
        ),
        (
            "storage.json bad entry",
            ["volume", "list", "--domain", master, "--storage-config", bad_entry],
            [bad_entry, "'sd1': not a UUID"],
            {},
        ),
        (
            "storage.json a directory",
            ["domain", "info", "--uuid", master, "--storage-config", d],
            [d, "cannot read"],
            {},
        ),
        ("hsm: storage.json not JSON", ["hsm", "--config", hsm_bad_storage], [bad_json, "not JSON"], {}),
        ("master not in storage.json", ["spm", "--config", spm_no_master], [other, "not found", no_master], {}),
        ("unknown domain", ["domain", "info", "--uuid", other, *st], [other, "not found"], {}),
        ("unknown volume", ["volume", "info", *new, *st], ["not found in storage domain", master], {}),
        (
            "volume exists",
            ["volume", "create", *vol, "--capacity", "64M", "--initial-size", "8M", "--local", *st],
            [r.volume, "already exists"],
            {},
        ),
        (
            "full VG",
            ["volume", "create", *new, "--capacity", "10G", "--local", *st],
            [f"domain {master} has", "free extents", "a qcow2 volume starts at one chunk, 640 extents (2.5 GiB)"],
            {},
        ),
        (
            "raw bigger than VG",
            ["volume", "create", *new, "--capacity", "4G", "--format", "raw", "--local", *st],
            ["a raw volume takes its whole capacity, 1024 extents (4.0 GiB)"],
            {},
        ),
        (
            "missing PV",
            ["domain", "info", "--uuid", master, "--pv", "/dev/xtnd-no-such-pv", *st],
            ["/dev/xtnd-no-such-pv"],
            {},
        ),
        (
            "zero initial size",
            ["volume", "create", *new, "--capacity", "1G", "--initial-size", "0", "--local", *st],
            ["initial size must be positive"],
            {},
        ),
        ("wrong size", ["volume", "create", *new, "--capacity", "10X", *st], ["not a size: '10X'"], {}),
        ("wrong UUID", ["volume", "info", "--domain", "abc", "--uuid", r.volume, *st], ["not a UUID: 'abc'"], {}),
        ("non-root volume list", ["volume", "list", "--domain", master, *st], ["must run as root"], {"AS": "nobody"}),
        ("non-root status", ["status"], ["root"], {"AS": "nobody"}),
        ("stale control socket", ["spm", "stats", "--socket", stale], [stale, "refused"], {}),
        (
            "no control socket",
            ["spm", "log-level", "xtnd.mailbox", "DEBUG", "--socket", stale + ".gone"],
            [stale + ".gone"],
            {},
        ),
        (
            "unreadable mailbox",
            ["mailbox", "dump", "--inbox", unreadable, "--outbox", unreadable],
            [unreadable],
            {"AS": "nobody"},
        ),
        (
            "missing mailbox device",
            ["mailbox", "dump", "--inbox", "/dev/xtnd-no-inbox", "--outbox", "/dev/null"],
            ["/dev/xtnd-no-inbox"],
            {},
        ),
        ("prepare unknown volume", ["volume", "prepare", *new, *st], ["not found"], {}),
        (
            "resize shrink",
            ["volume", "resize", *vol, "--size", "32M", "--local", *st],
            [r.volume, "shrinking it to 33554432 bytes is not supported"],
            {},
        ),
        ("resize bad size", ["volume", "resize", *vol, "--size", "ten", *st], ["not a size: 'ten'"], {}),
        (
            "resize not in sectors",
            ["volume", "resize", *vol, "--size", "67109377", "--local", *st],
            ["multiple of 512"],
            {},
        ),
        (
            "resize above free space",
            ["volume", "resize", *vol, "--size", "10G", "--local", *st],
            [f"domain {master} has", f"growing volume {r.volume} needs"],
            {},
        ),
        ("resize unknown volume", ["volume", "resize", *new, "--size", "1G", "--local", *st], ["not found"], {}),
    ]


def run(argv: list[str], env_extra: dict[str, str]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "XTND_SPM_SOCKET": "/nonexistent/xtnd-spm.sock", "XTND_HSM_SOCKET": "/nonexistent/hsm.sock"}
    cmd = [XTND, *argv]
    if env_extra.get("AS"):
        cmd = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)


def test_mistakes(rig: Rig) -> None:
    """>= 20 mistakes; the table is printed (-s) for the record."""
    table = mistakes(rig)
    assert len(table) >= 20
    failures = []
    # Independent commands: run a few at once (each is mostly interpreter
    # start-up); LVM's own VG lock orders the ones that touch the VG.
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        done = list(pool.map(lambda row: run(row[1], row[3]), table))
    for (name, argv, facts, _), p in zip(table, done, strict=True):
        lines = [line for line in p.stderr.splitlines() if line.strip()]
        last = lines[-1] if lines else ""
        print(f"{name:28} rc={p.returncode} xtnd {' '.join(argv)}\n    {last}")
        usage = lines and lines[0].startswith("usage:")
        problems = []
        if p.returncode == 0:
            problems.append("exit 0")
        if "Traceback" in p.stderr or "Traceback" in p.stdout:
            problems.append("traceback")
        if len(lines) != 1 and not (usage and ": error: " in last):
            problems.append(f"{len(lines)} lines on stderr")
        problems += [f"does not name {fact!r}" for fact in facts if fact not in last]
        if problems:
            failures.append(f"{name}: {', '.join(problems)}: {p.stderr[-2000:]}")
    assert not failures, "\n".join(failures)
