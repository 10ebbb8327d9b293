"""xtnd mailbox dump / decode / watch on real files and loop devices."""

from __future__ import annotations

import io
import json
import os
import subprocess
import uuid
from collections.abc import Callable, Iterator

import pytest
from xtnd.mailbox import codec
from xtnd.tools import cli
from xtnd.tools.rig import loops

BLOCK = codec.BLOCK_SIZE
DOMAIN = uuid.UUID("8adbc85e-e554-4ae0-b318-8a5465fe5fe1")
VOLUME = uuid.UUID("d772f1c6-3ebb-43c3-a42e-73fcd8255a5f")
OTHER = uuid.UUID("6b1e2a47-31f4-4d0e-9a8b-2c4f5e6d7a80")
EVENT = uuid.UUID("0f0e0d0c-0b0a-4908-8706-050403020100")

# mailbox/PROTOCOL.md §2 test vector: the bytes a vdsm HSM writes for domain DOMAIN,
# volume VOLUME, 2560 MiB.
VDSM_REQUEST = bytes.fromhex(
    "3178746e64e15ffe65548a18b3e04a54e55ec8db8a5f5a25d8fc732ea4c343bb"
    "3ec6f172d7303030303030303030303030306130303030303030303030303030"
)
# VDSM_REQUEST as the JSON reports show a decoded message.
VDSM_REQUEST_JSON = {
    "kind": "extend",
    "domain": str(DOMAIN),
    "volume": str(VOLUME),
    "size_mb": 2560,
    "opcode": None,
    "reason": None,
    "raw": VDSM_REQUEST.hex(),
}
GRANTED = codec.encode(codec.Extend(DOMAIN, VOLUME, 5120))
FAILED = codec.encode(codec.Extend(DOMAIN, VOLUME, 0))
OTHER_REQUEST = codec.encode(codec.Extend(DOMAIN, OTHER, 1024))
UNKNOWN = b"1abcd" + bytes(59)
UNDECODABLE = VDSM_REQUEST[:37] + b"not hex!" + VDSM_REQUEST[45:]

Run = Callable[..., tuple[int, str, str]]


@pytest.fixture
def xtnd(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Run:
    """Run ``xtnd mailbox ARGS`` through cli.main; return (exit code, stdout, stderr).

    The parser imports every area's commands. While another area's module
    cannot register yet, keep only this one so these tests still run the
    real entry point.
    """
    try:
        cli.build_parser()
    except (ImportError, AttributeError):
        monkeypatch.setattr(cli, "MAILBOX_COMMANDS", ["xtnd.tools.inspect"])
        monkeypatch.setattr(cli, "TOP_COMMANDS", [])

    def run(*args: str) -> tuple[int, str, str]:
        rc = cli.main(["mailbox", *args])
        out, err = capsys.readouterr()
        return rc, out, err

    return run


def write_area(path: str, blocks: dict[int, bytes], size: int) -> str:
    with open(path, "wb") as f:
        f.truncate(size)
        for index, data in blocks.items():
            f.seek(index * BLOCK)
            f.write(data)
    return path


def bad_checksum(slots: list[bytes]) -> bytes:
    block = bytearray(codec.build_block(slots))
    block[codec.CHECKSUM_OFFSET :] = (1234).to_bytes(4, "little", signed=True)
    return bytes(block)


def busy_blocks() -> tuple[dict[int, bytes], dict[int, bytes]]:
    """A mailbox with every handshake state, a bad block and junk."""
    inbox = {
        0: codec.encode_event(EVENT),
        1: codec.build_block(
            [
                VDSM_REQUEST,  # pending
                VDSM_REQUEST,  # replied
                VDSM_REQUEST,  # failed
                codec.CLEAN_MESSAGE,  # acking
                codec.CLEAN_MESSAGE,  # acked
                codec.EMPTY_MESSAGE,  # done
                codec.EMPTY_MESSAGE,  # orphan-reply
                UNKNOWN,
                UNDECODABLE,
                OTHER_REQUEST,  # pending: outbox holds a reply for VOLUME
            ]
        ),
        3: bad_checksum([VDSM_REQUEST]),
        7: codec.build_block([]),  # all zero: idle, hidden
    }
    outbox = {
        1: codec.build_block(
            [
                codec.EMPTY_MESSAGE,
                GRANTED,
                FAILED,
                GRANTED,
                codec.CLEAN_MESSAGE,
                codec.CLEAN_MESSAGE,
                GRANTED,
                codec.EMPTY_MESSAGE,
                codec.EMPTY_MESSAGE,
                GRANTED,
            ],
            with_checksum=False,
        ),
        # Host 4: the SPM's clean echo left behind, nothing in flight.
        4: codec.build_block([codec.CLEAN_MESSAGE], with_checksum=False),
    }
    return inbox, outbox


@pytest.fixture
def areas(workdir: str) -> tuple[str, str]:
    inbox, outbox = busy_blocks()
    size = 251 * BLOCK
    return (
        write_area(os.path.join(workdir, "inbox"), inbox, size),
        write_area(os.path.join(workdir, "outbox"), outbox, size),
    )


def dump_json(xtnd: Run, inbox: str, outbox: str, *args: str) -> dict[str, object]:
    rc, out, err = xtnd("dump", "--inbox", inbox, "--outbox", outbox, "--json", *args)
    assert rc == 0
    result: dict[str, object] = json.loads(out)
    return result


def slot_states(report: dict[str, object], host: int) -> dict[int, str]:
    hosts = report["hosts"]
    assert isinstance(hosts, list)
    (entry,) = [h for h in hosts if h["host"] == host]
    return {s["slot"]: s["state"] for s in entry["slots"]}


def test_spec_vector_checksum() -> None:
    block = codec.build_block([VDSM_REQUEST])
    assert block[codec.CHECKSUM_OFFSET :] == bytes.fromhex("60190000")


def test_dump_human(xtnd: Run, areas: tuple[str, str]) -> None:
    rc, out, err = xtnd("dump", "--inbox", areas[0], "--outbox", areas[1])
    assert rc == 0
    assert str(EVENT) in out
    assert "host 1  checksum ok" in out
    assert "host 3  checksum BAD: stored 1234, computed 6496" in out
    assert "host 7" not in out
    for text in (str(DOMAIN), str(VOLUME), "extend 2560 MiB", "extend 5120 MiB", "granted 5120 MiB"):
        assert text in out
    for state in ("pending", "replied", "failed", "acking", "acked", "done", "orphan-reply", "unknown-request"):
        assert state in out
    assert "invalid-request" in out
    assert f"slot 8 inbox raw: {UNDECODABLE.hex()}" in out


def test_dump_states(xtnd: Run, areas: tuple[str, str]) -> None:
    report = dump_json(xtnd, *areas)
    assert report["max_hosts"] == 250
    assert slot_states(report, 1) == {
        0: "pending",
        1: "replied",
        2: "failed",
        3: "acking",
        4: "acked",
        5: "done",
        6: "orphan-reply",
        7: "unknown-request",
        8: "invalid-request",
        9: "pending",
    }
    assert slot_states(report, 3) == {0: "invalid-block"}
    assert slot_states(report, 4) == {0: "done"}
    hosts = report["hosts"]
    assert isinstance(hosts, list)
    assert [h["host"] for h in hosts] == [1, 3, 4]
    assert [h["idle"] for h in hosts] == [False, False, True]


def test_dump_vdsm_request_fields(xtnd: Run, areas: tuple[str, str]) -> None:
    report = dump_json(xtnd, *areas)
    hosts = report["hosts"]
    assert isinstance(hosts, list)
    request = hosts[0]["slots"][0]["inbox"]
    assert request == VDSM_REQUEST_JSON
    assert hosts[0]["checksum"]["valid"] is True


def test_dump_bad_checksum(xtnd: Run, areas: tuple[str, str]) -> None:
    report = dump_json(xtnd, *areas, "--host", "3")
    hosts = report["hosts"]
    assert isinstance(hosts, list)
    assert hosts[0]["checksum"] == {"stored": 1234, "computed": 6496, "valid": False}
    assert hosts[0]["slots"][0]["state"] == "invalid-block"
    summary = report["summary"]
    assert isinstance(summary, dict)
    assert summary["invalid_blocks"] == 1
    assert summary["hosts_busy"] == 1


def test_dump_undecodable_and_unknown(xtnd: Run, areas: tuple[str, str]) -> None:
    report = dump_json(xtnd, *areas, "--host", "1")
    hosts = report["hosts"]
    assert isinstance(hosts, list)
    slots = {s["slot"]: s for s in hosts[0]["slots"]}
    bad = slots[8]["inbox"]
    assert bad["kind"] == "invalid"
    assert bad["raw"] == UNDECODABLE.hex()
    assert "not hex" in bad["reason"]
    assert slots[7]["inbox"]["kind"] == "unknown"
    assert slots[7]["inbox"]["opcode"] == "abcd"


def test_dump_idle_host_on_request(xtnd: Run, areas: tuple[str, str]) -> None:
    report = dump_json(xtnd, *areas, "--host", "7", "--host", "9")
    hosts = report["hosts"]
    assert isinstance(hosts, list)
    assert [(h["host"], h["idle"], h["slots"]) for h in hosts] == [(7, True, []), (9, True, [])]
    rc, out, err = xtnd("dump", "--inbox", areas[0], "--outbox", areas[1], "--host", "7")
    assert rc == 0
    assert "host 7  checksum ok (0)" in out
    assert "no messages" in out


def test_dump_short_copy(xtnd: Run, workdir: str) -> None:
    inbox_blocks, outbox_blocks = busy_blocks()
    inbox = write_area(os.path.join(workdir, "inbox"), inbox_blocks, 251 * BLOCK)
    # A copy cut in the middle of host 3's block.
    outbox_blocks = {i: b for i, b in outbox_blocks.items() if i < 3}
    outbox = write_area(os.path.join(workdir, "outbox"), outbox_blocks, 3 * BLOCK + 100)
    report = dump_json(xtnd, inbox, outbox)
    assert report["max_hosts"] == 2
    assert report["outbox"] == {"path": outbox, "size": 3 * BLOCK + 100, "blocks": 3}
    assert list(slot_states(report, 1).values())[:2] == ["pending", "replied"]

    report = dump_json(xtnd, inbox, outbox, "--host", "3", "--host", "300")
    hosts = report["hosts"]
    assert isinstance(hosts, list)
    assert hosts[0]["outbox_present"] is False
    assert hosts[0]["slots"][0]["state"] == "invalid-block"
    assert hosts[0]["slots"][0]["outbox"]["kind"] == "missing"
    assert hosts[1]["inbox_present"] is False
    assert hosts[1]["checksum"] is None


def test_dump_incomplete(xtnd: Run, workdir: str) -> None:
    inbox = write_area(os.path.join(workdir, "inbox"), {1: codec.build_block([VDSM_REQUEST])}, 4 * BLOCK)
    outbox = write_area(os.path.join(workdir, "outbox"), {}, BLOCK)
    report = dump_json(xtnd, inbox, outbox, "--host", "1")
    assert slot_states(report, 1) == {0: "incomplete"}


def test_dump_event_states(xtnd: Run, workdir: str) -> None:
    outbox = write_area(os.path.join(workdir, "outbox"), {}, 2 * BLOCK)
    inbox = write_area(os.path.join(workdir, "inbox"), {}, 2 * BLOCK)
    assert dump_json(xtnd, inbox, outbox)["event"] == {
        "state": "never-written",
        "uuid": None,
        "reason": None,
        "raw_head": None,
    }
    write_area(inbox, {0: b"junk" + bytes(BLOCK - 4)}, 2 * BLOCK)
    event = dump_json(xtnd, inbox, outbox)["event"]
    assert isinstance(event, dict)
    assert event["state"] == "invalid"
    assert event["raw_head"] == (b"junk" + bytes(28)).hex()
    rc, out, err = xtnd("dump", "--inbox", inbox, "--outbox", outbox)
    assert "event   invalid" in out


def test_dump_empty_copy(xtnd: Run, workdir: str) -> None:
    inbox = write_area(os.path.join(workdir, "inbox"), {}, 0)
    outbox = write_area(os.path.join(workdir, "outbox"), {}, 0)
    report = dump_json(xtnd, inbox, outbox)
    assert report["max_hosts"] == 0
    assert report["hosts"] == []
    event = report["event"]
    assert isinstance(event, dict)
    assert event["state"] == "missing"


def test_dump_max_hosts_capped(xtnd: Run, workdir: str) -> None:
    size = 16 * 1024**2  # a vdsm inbox LV
    inbox = write_area(os.path.join(workdir, "inbox"), {2000: codec.build_block([VDSM_REQUEST])}, size)
    outbox = write_area(os.path.join(workdir, "outbox"), {}, size)
    report = dump_json(xtnd, inbox, outbox)
    assert report["max_hosts"] == 2000
    assert slot_states(report, 2000) == {0: "pending"}
    report = dump_json(xtnd, inbox, outbox, "--max-hosts", "10")
    assert report["hosts"] == []


def test_dump_missing_file(xtnd: Run, workdir: str) -> None:
    missing = os.path.join(workdir, "nope")
    rc, _, err = xtnd("dump", "--inbox", missing, "--outbox", missing)
    assert rc == 1
    assert "cannot open" in err


def test_dump_copy_on_tmpfs(xtnd: Run, areas: tuple[str, str]) -> None:
    """tmpfs has no O_DIRECT; a copy there is read through the page cache."""
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    copies = []
    try:
        for path in areas:
            copy = f"/dev/shm/xtnd-inspect-{uuid.uuid4().hex[:8]}"
            with open(path, "rb") as src, open(copy, "wb") as dst:
                dst.write(src.read())
            copies.append(copy)
        report = dump_json(xtnd, *copies)
        assert slot_states(report, 3) == {0: "invalid-block"}
    finally:
        for copy in copies:
            os.unlink(copy)


GOLDEN = os.path.join(os.path.dirname(__file__), "data", "inspect_dump.json")


def test_dump_json_golden(xtnd: Run, areas: tuple[str, str]) -> None:
    """The JSON schema is an interface: changing it must be deliberate.

    On a deliberate change, bump SCHEMA_VERSION if keys are renamed or
    removed, update the docs, and regenerate the golden file.
    """
    report = dump_json(xtnd, *areas)
    inbox, outbox = report["inbox"], report["outbox"]
    assert isinstance(inbox, dict) and isinstance(outbox, dict)
    inbox["path"], outbox["path"] = "INBOX", "OUTBOX"
    with open(GOLDEN) as f:
        assert report == json.load(f)


@pytest.fixture(params=[512, 4096], ids=["sector512", "sector4096"])
def loop_areas(request: pytest.FixtureRequest, need_root: None, areas: tuple[str, str]) -> Iterator[tuple[str, str]]:
    sector = request.param
    with loops.loop_device(areas[0], sector) as inbox, loops.loop_device(areas[1], sector) as outbox:
        yield inbox, outbox


@pytest.mark.root
def test_dump_loop_device(xtnd: Run, loop_areas: tuple[str, str], areas: tuple[str, str]) -> None:
    from_device = dump_json(xtnd, *loop_areas)
    from_file = dump_json(xtnd, *areas)
    for report in (from_device, from_file):
        del report["inbox"], report["outbox"]
    assert from_device == from_file


# decode


def test_decode_message(xtnd: Run) -> None:
    rc, out, err = xtnd("decode", VDSM_REQUEST.hex())
    assert rc == 0
    assert str(DOMAIN) in out and str(VOLUME) in out and "2560" in out
    rc, out, err = xtnd("decode", "--json", VDSM_REQUEST.hex()[:64], VDSM_REQUEST.hex()[64:])
    assert rc == 0
    assert json.loads(out) == {
        "schema_version": 1,
        "type": "message",
        "message": VDSM_REQUEST_JSON,
    }


def test_decode_undecodable_message(xtnd: Run) -> None:
    rc, out, err = xtnd("decode", "--json", UNDECODABLE.hex())
    assert rc == 0
    message = json.loads(out)["message"]
    assert message["kind"] == "invalid"
    assert "not hex" in message["reason"]
    rc, out, err = xtnd("decode", UNDECODABLE.hex())
    assert rc == 0
    assert "invalid" in out


def test_decode_block(xtnd: Run) -> None:
    block = codec.build_block([VDSM_REQUEST, codec.EMPTY_MESSAGE, UNKNOWN])
    # As pasted from hexdump-like output: whitespace anywhere.
    text = "\n".join(block.hex()[i : i + 64] for i in range(0, 2 * BLOCK, 64))
    rc, out, err = xtnd("decode", "--json", text)
    assert rc == 0
    decoded = json.loads(out)
    assert decoded["type"] == "block"
    assert decoded["block"]["checksum"]["valid"] is True
    assert decoded["block"]["event"] is None
    assert [(s["slot"], s["message"]["kind"]) for s in decoded["block"]["slots"]] == [(0, "extend"), (2, "unknown")]
    rc, out, err = xtnd("decode", text)
    assert rc == 0
    assert "2 non-empty slots" in out
    assert f"checksum stored {codec.checksum(block)}, computed {codec.checksum(block)}: ok" in out


def test_decode_event_block(xtnd: Run) -> None:
    rc, out, err = xtnd("decode", "--json", codec.encode_event(EVENT).hex())
    assert rc == 0
    assert json.loads(out)["block"]["event"]["uuid"] == str(EVENT)
    rc, out, err = xtnd("decode", codec.encode_event(EVENT).hex())
    assert f"event block: {EVENT}" in out


@pytest.mark.parametrize("text", ["zz" * 64, "00" * 63, "0" * 127])
def test_decode_bad_input(xtnd: Run, text: str) -> None:
    rc, out, err = xtnd("decode", text)
    assert rc == 1
    assert out == ""
    assert err.startswith("xtnd mailbox: ")


# watch


def test_watch_once(xtnd: Run, areas: tuple[str, str]) -> None:
    rc, out, err = xtnd("watch", "--inbox", areas[0], "--outbox", areas[1], "--once")
    assert rc == 0
    assert "2 busy hosts" in out
    assert "scan    #1" in out
    # Only non-idle slots: host 4 (done) and host 1's done slot are left out.
    assert "\n│    4 │" not in out
    assert "done" not in out.split("busy hosts", 1)[1]
    for state in ("pending", "replied", "acking", "invalid-block"):
        assert state in out


def test_watch_iterations_live(xtnd: Run, areas: tuple[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """With a terminal, watch refreshes one rich.live view in place."""
    monkeypatch.setenv("FORCE_COLOR", "1")
    monkeypatch.delenv("NO_COLOR", raising=False)
    rc, out, err = xtnd("watch", "--inbox", areas[0], "--outbox", areas[1], "--iterations", "2", "--interval", "0.01")
    assert rc == 0
    assert "#2" in out
    assert "\x1b[" in out  # cursor movement of the live display


def test_xtnd_binary(areas: tuple[str, str]) -> None:
    try:
        cli.build_parser()
    except (ImportError, AttributeError) as e:
        pytest.skip(f"another area's command cannot register yet: {e}")
    xtnd = "/opt/xtnd/venv/bin/xtnd"
    result = subprocess.run(
        [xtnd, "mailbox", "dump", "--inbox", areas[0], "--outbox", areas[1], "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert json.loads(result.stdout)["summary"]["hosts_busy"] == 2


def test_decode_stdin(xtnd: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO(VDSM_REQUEST.hex()[:64] + "\n" + VDSM_REQUEST.hex()[64:] + "\n"))
    rc, out, err = xtnd("decode", "--json", "-")
    assert rc == 0
    assert json.loads(out)["message"]["size_mb"] == 2560
