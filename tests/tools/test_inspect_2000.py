"""The inspection tool on a full 2000-host mailbox: busy hosts only, the
--host filter, and a watch that fits the terminal."""

from __future__ import annotations

import json
import os
import sys
import time
import uuid

import pytest
from xtnd.mailbox import codec
from xtnd.tools import cli, inspect, mailbox_view

BLOCK = codec.BLOCK_SIZE
HOSTS = 2000
DOMAIN = uuid.uuid4()
PENDING = codec.encode(codec.Extend(DOMAIN, uuid.uuid4(), 1024))
REPLIED = codec.encode(codec.Extend(DOMAIN, uuid.uuid4(), 2048))


@pytest.fixture
def areas(workdir: str) -> tuple[str, str]:
    """Every host done (the SPM's clean echo behind), host 5 pending with
    two requests, host 1999 replied."""
    inbox = bytearray((HOSTS + 1) * BLOCK)
    outbox = bytearray((HOSTS + 1) * BLOCK)
    for h in range(1, HOSTS + 1):
        outbox[h * BLOCK : h * BLOCK + codec.MESSAGE_SIZE] = codec.CLEAN_MESSAGE
    inbox[5 * BLOCK : 6 * BLOCK] = codec.build_block([PENDING, PENDING])
    inbox[1999 * BLOCK : 2000 * BLOCK] = codec.build_block([REPLIED])
    outbox[1999 * BLOCK : 2000 * BLOCK] = codec.build_block([REPLIED], with_checksum=False)
    paths = []
    for name, data in (("inbox", inbox), ("outbox", outbox)):
        path = os.path.join(workdir, name)
        with open(path, "wb") as f:
            f.write(data)
        paths.append(path)
    return paths[0], paths[1]


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    rc = cli.main(["mailbox", *args])
    return rc, capsys.readouterr().out


def test_dump_busy_only(areas: tuple[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    began = time.monotonic()
    rc, out = run(capsys, "dump", "--inbox", areas[0], "--outbox", areas[1], "--busy", "--json")
    print(f"dump --busy of {HOSTS} hosts: {time.monotonic() - began:.2f} s", file=sys.stderr)
    assert rc == 0
    report = json.loads(out)
    assert [h["host"] for h in report["hosts"]] == [5, 1999]
    assert report["summary"]["hosts_scanned"] == HOSTS
    assert report["summary"]["hosts_shown"] == 2
    assert report["summary"]["hosts_busy"] == 2
    assert report["summary"]["states"]["pending"] == 2
    assert report["summary"]["states"]["replied"] == 1
    # Without --busy every served host shows, each with its done echo.
    rc, out = run(capsys, "dump", "--inbox", areas[0], "--outbox", areas[1], "--json")
    assert json.loads(out)["summary"]["hosts_shown"] == HOSTS
    rc, out = run(capsys, "dump", "--inbox", areas[0], "--outbox", areas[1], "--busy")
    assert "host 5 " in out and "host 1999 " in out and "host 6 " not in out


def test_host_filter(areas: tuple[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    rc, out = run(capsys, "dump", "--inbox", areas[0], "--outbox", areas[1], "--host", "7", "--host", "1999", "--json")
    assert rc == 0
    hosts = json.loads(out)["hosts"]
    assert [(h["host"], h["idle"]) for h in hosts] == [(7, True), (1999, False)]
    rc, out = run(capsys, "dump", "--inbox", areas[0], "--outbox", areas[1], "--host", "7", "--busy", "--json")
    assert json.loads(out)["hosts"] == []
    rc, out = run(capsys, "watch", "--inbox", areas[0], "--outbox", areas[1], "--host", "5", "--once")
    assert "1 busy hosts" in out


def test_watch_rows_limited(areas: tuple[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    rc, out = run(capsys, "watch", "--inbox", areas[0], "--outbox", areas[1], "--once")
    assert rc == 0
    assert "2 busy hosts" in out
    assert "done" not in out.split("busy hosts", 1)[1]
    with mailbox_view.AreaReader(areas[0]) as inbox, mailbox_view.AreaReader(areas[1]) as outbox:
        report = mailbox_view.Scanner(inbox, outbox, None, None).scan()
    console = inspect.Console(width=200, record=True)
    console.print(inspect.watch_view(report, 1, max_rows=1))
    text = console.export_text()
    assert "... 2 more busy slots" in text


def test_watch_uses_alternate_screen(
    areas: tuple[str, str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FORCE_COLOR", "1")
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("LINES", "20")
    rc, out = run(capsys, "watch", "--inbox", areas[0], "--outbox", areas[1], "--iterations", "2",
                  "--interval", "0.01")
    assert rc == 0
    assert "\x1b[?1049h" in out and "\x1b[?1049l" in out  # entered and left the alternate screen
    assert "#2" in out
