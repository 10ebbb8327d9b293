"""Bytes vdsm's own mailbox code wrote (tests/data/vdsm, see its README).

Every other interop test builds its vdsm peer from xtnd's codec; these
check xtnd against the real thing: the inspection tool reads vdsm's areas,
xtnd's SPM answers vdsm's requests with the bytes vdsm's SPM wrote, and
xtnd's HSM takes vdsm's replies as grants.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid

from xtnd.mailbox import codec
from xtnd.mailbox.directio import DirectFile
from xtnd.mailbox.hsm import HSMConfig, HSMMailbox
from xtnd.mailbox.spm import Request, SPMConfig, SPMMailbox
from xtnd.tools.rig.wait import wait_for

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "vdsm")
XTND = os.path.join(os.path.dirname(sys.executable), "xtnd")
MAX_HOSTS = 10
HOST = 3
DOMAIN = uuid.UUID("8adbc85e-e554-4ae0-b318-8a5465fe5fe1")
VOLUMES = {
    0: (uuid.UUID("d772f1c6-3ebb-43c3-a42e-73fcd8255a5f"), 3072),
    1: (uuid.UUID("5f1c3a6e-2b7d-4c1e-9a0f-3d2e1b4c5a6f"), 5120),
}


def vector(name: str) -> bytes:
    with open(os.path.join(DATA, name), "rb") as f:
        return f.read()


def copy(workdir: str, name: str, as_name: str | None = None) -> str:
    """A writable copy (under /var/tmp: O_DIRECT) of a vector file."""
    path = os.path.join(workdir, as_name or name)
    shutil.copyfile(os.path.join(DATA, name), path)
    os.chmod(path, 0o644)
    return path


def dump(inbox: str, outbox: str) -> dict[str, object]:
    p = subprocess.run(
        [XTND, "mailbox", "dump", "--json", "--inbox", inbox, "--outbox", outbox],
        capture_output=True,
        text=True,
        check=True,
    )
    result: dict[str, object] = json.loads(p.stdout)
    return result


def test_vectors_are_what_their_readme_says() -> None:
    inbox = vector("1-requested-inbox.bin")
    assert len(inbox) == (MAX_HOSTS + 1) * codec.BLOCK_SIZE
    block = inbox[HOST * codec.BLOCK_SIZE : (HOST + 1) * codec.BLOCK_SIZE]
    assert codec.checksum_valid(block)
    assert int.from_bytes(block[codec.CHECKSUM_OFFSET :], "little", signed=True) == 11801
    assert vector("1-requested-outbox.bin") == bytes(len(inbox))
    assert vector("2-replied-inbox.bin") == inbox


def test_inspection_shows_vdsm_states(workdir: str) -> None:
    for step, state in (("1-requested", "pending"), ("2-replied", "replied")):
        report = dump(os.path.join(DATA, f"{step}-inbox.bin"), os.path.join(DATA, f"{step}-outbox.bin"))
        assert report["event"]["state"] == "ok"  # type: ignore[index]
        [host] = report["hosts"]  # type: ignore[misc]
        assert host["host"] == HOST and host["checksum"]["valid"]
        slots = {s["slot"]: s for s in host["slots"]}
        assert set(slots) == set(VOLUMES)
        for n, (volume, size_mb) in VOLUMES.items():
            assert slots[n]["state"] == state, (step, slots[n])
            request = slots[n]["inbox"]
            assert (request["kind"], request["domain"], request["volume"], request["size_mb"]) == (
                "extend",
                str(DOMAIN),
                str(volume),
                size_mb,
            )


def test_our_spm_answers_vdsm_requests_byte_identical(workdir: str) -> None:
    inbox = DirectFile(copy(workdir, "1-requested-inbox.bin"))
    outbox = DirectFile(copy(workdir, "1-requested-outbox.bin"))
    served: list[Request] = []

    def grant(req: Request) -> int:
        served.append(req)
        return req.message.size_mb

    spm = SPMMailbox(inbox, outbox, MAX_HOSTS, SPMConfig(workers=0))
    spm.register(codec.EXTEND_OPCODE, grant)
    spm.step()
    assert sorted((r.host_id, r.slot, r.message.volume, r.message.size_mb) for r in served) == sorted(
        (HOST, n, v, s) for n, (v, s) in VOLUMES.items()
    )
    assert outbox.read(0, outbox.size) == vector("2-replied-outbox.bin")


def test_our_hsm_takes_vdsm_replies_as_grants(workdir: str) -> None:
    inbox_path = os.path.join(workdir, "inbox")
    with open(inbox_path, "wb") as f:
        f.write(bytes((MAX_HOSTS + 1) * codec.BLOCK_SIZE))
    outbox_path = copy(workdir, "1-requested-outbox.bin", "outbox")
    hsm = HSMMailbox(DirectFile(inbox_path), DirectFile(outbox_path), HOST, HSMConfig(poll_max=0.01))
    hsm.start()
    try:
        futures = [hsm.submit(DOMAIN, v, s * codec.MiB) for v, s in VOLUMES.values()]
        vdsm_block = vector("1-requested-inbox.bin")[HOST * codec.BLOCK_SIZE : (HOST + 1) * codec.BLOCK_SIZE]

        def our_block() -> bytes:
            with open(inbox_path, "rb") as f:
                f.seek(HOST * codec.BLOCK_SIZE)
                return f.read(codec.BLOCK_SIZE)

        # Our HSM's requests are the bytes vdsm's HSM wrote.
        wait_for(lambda: our_block() == vdsm_block, what="our inbox block equal to vdsm's")
        # vdsm's SPM answers (the replied outbox lands on storage).
        replied = vector("2-replied-outbox.bin")
        with open(outbox_path, "r+b") as f:
            f.write(replied)
        assert [f.result(30) for f in futures] == [s * codec.MiB for _, s in VOLUMES.values()]
    finally:
        hsm.stop()
