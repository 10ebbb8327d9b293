"""``xtnd mailbox dump|decode|watch``: look inside the storage mailbox.

vdsm has no way to see what its mailbox holds; this tool decodes live inbox
and outbox devices (read only, O_DIRECT) or copies of them, and tells for
every slot index where its extend handshake stands (mailbox/PROTOCOL.md §2). Malformed
bytes never make it fail: they are shown, in hex, with the reason.

    xtnd mailbox dump --inbox PATH --outbox PATH [--host N]... [--busy] [--max-hosts N] [--json]
    xtnd mailbox decode HEX... [--json]
    xtnd mailbox watch --inbox PATH --outbox PATH [--interval S] [--once | --iterations N]

``--max-hosts`` defaults to what the smaller area holds (size / 4096 - 1,
at most 2000). ``--host`` shows only the hosts named (even idle ones);
without it, hosts whose inbox and outbox blocks are both all zeros are left
out. ``--busy`` leaves out idle hosts too (those whose slots are all free
or done: after a wave every host of a 2000-host pool keeps the SPM's echo).
``watch`` shows busy slots only, as many as the terminal has rows for,
redrawn in the terminal's alternate screen (no scrolling, no flicker; the
shell's screen comes back on exit); into a pipe it prints one view per scan.

The JSON of ``dump --json`` and ``decode --json`` (schema_version 1,
keys only ever added within a version) is described in README.md
("Mailbox inspection"); tests/tools/data/inspect_dump.json is a full
example. State names and meanings are in xtnd.tools.mailbox_state.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import threading
import time
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text
from xtnd.mailbox import codec, directio

from . import mailbox_view as view
from .mailbox_state import IDLE_STATES, Kind, State, read_slot

# Non-terminal output (pipes, files) is not wrapped at 80 columns: a slot
# row holds two UUIDs.
PIPE_WIDTH = 200
# Rows in the watch table; the summary still counts everything.
WATCH_ROWS = 60
# Terminal lines the watch view needs besides its slot rows: header (6),
# table title, borders and heading (5), the "more" note (1).
WATCH_CHROME = 12

_STYLES = {
    State.PENDING: "yellow",
    State.REPLIED: "green",
    State.FAILED: "red",
    State.ACKING: "cyan",
    State.ACKED: "cyan",
    State.ORPHAN_REPLY: "magenta",
    State.UNKNOWN_REQUEST: "magenta",
    State.INVALID_REQUEST: "bold red",
    State.INVALID_REPLY: "bold red",
    State.INVALID_BLOCK: "bold red",
    State.INCOMPLETE: "dim",
}


def register(subparsers: Any) -> None:
    dump = subparsers.add_parser("dump", help="decode inbox and outbox, slot by slot")
    _area_args(dump)
    dump.add_argument("--max-hosts", type=int, help="host ids to consider (default: what the smaller area holds)")
    dump.add_argument("--busy", action="store_true", help="only hosts with a slot neither free nor done")
    dump.add_argument("--json", action="store_true", help="machine-readable output (schema in the module docstring)")
    dump.set_defaults(func=run_dump)

    decode = subparsers.add_parser("decode", help="decode one 64-byte message or one 4096-byte block given in hex")
    decode.add_argument(
        "hex", nargs="+", metavar="HEX", help="128 or 8192 hex digits, whitespace ignored; - reads stdin"
    )
    decode.add_argument("--json", action="store_true", help="machine-readable output")
    decode.set_defaults(func=run_decode)

    watch = subparsers.add_parser("watch", help="live view of busy hosts")
    _area_args(watch)
    watch.add_argument("--max-hosts", type=int, help="host ids to consider (default: what the smaller area holds)")
    watch.add_argument("--interval", type=float, default=1.0, help="seconds between scans (default 1)")
    stop = watch.add_mutually_exclusive_group()
    stop.add_argument("--once", action="store_const", const=1, dest="iterations", help="scan once and exit")
    stop.add_argument("--iterations", type=int, help="exit after this many scans (default: until Ctrl-C)")
    watch.set_defaults(func=run_watch)


def _area_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--inbox", required=True, help="inbox device or file (a copy is fine)")
    parser.add_argument("--outbox", required=True, help="outbox device or file (a copy is fine)")
    parser.add_argument(
        "--host", type=int, action="append", help="show only this host id, even if idle (repeatable)"
    )


def _console() -> Console:
    console = Console(highlight=False)
    if not console.is_terminal:
        console = Console(highlight=False, width=PIPE_WIDTH)
    return console


def _fail(message: str) -> int:
    print(f"xtnd mailbox: {message}", file=sys.stderr)
    return 1


# dump


def run_dump(args: argparse.Namespace) -> int:
    try:
        with view.AreaReader(args.inbox) as inbox, view.AreaReader(args.outbox) as outbox:
            report = view.Scanner(inbox, outbox, args.max_hosts, args.host).scan()
    except (directio.StorageError, OSError) as e:
        return _fail(str(e))
    if args.busy:
        report = dataclasses.replace(report, hosts=report.busy)
    if args.json:
        json.dump(report.to_json(), sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    console = _console()
    console.print(_header(report))
    for host in report.hosts:
        console.print(_host_table(host))
    return 0


def _header(report: view.Report) -> Table:
    grid = Table.grid(padding=(0, 2))
    for area, name in ((report.inbox, "inbox"), (report.outbox, "outbox")):
        grid.add_row(name, f"{area.path}  {area.size} bytes ({area.size // codec.BLOCK_SIZE} blocks)")
    style = "red" if report.event.state == "invalid" else ""
    grid.add_row("event", Text(report.event.describe(), style=style))
    busy = len(report.busy)
    grid.add_row(
        "hosts",
        f"{report.scanned} scanned (max hosts {report.max_hosts}), {len(report.hosts)} shown, {busy} busy",
    )
    grid.add_row("slots", _counts_text(report.counts()))
    return grid


def _counts_text(counts: dict[str, int]) -> Text:
    text = Text()
    for name, n in counts.items():
        if n:
            if text:
                text.append(", ")
            text.append(f"{name} {n}", style=_STYLES.get(State(name), ""))
    return text or Text("none")


def _checksum_text(host: view.HostReport) -> Text:
    if host.checksum is None:
        return Text("inbox block missing", style="dim")
    if host.checksum.valid:
        return Text(f"checksum ok ({host.checksum.stored})")
    return Text(f"checksum BAD: stored {host.checksum.stored}, computed {host.checksum.computed}", style="bold red")


def _host_table(host: view.HostReport) -> Table:
    title = Text(f"host {host.host}  ")
    title.append_text(_checksum_text(host))
    if not host.outbox_present:
        title.append("  outbox block missing", style="dim")
    table = _slot_table(title)
    notes: list[str] = []
    for slot in host.slots:
        _add_slot_row(table, slot, notes)
    if not host.slots:
        table.add_row("", "free", "", "", "", "", "no messages")
    for side, raw in (("inbox", host.inbox_reserved), ("outbox", host.outbox_reserved)):
        if raw:
            notes.append(f"{side} reserved slot: {raw.hex()}")
    _set_notes(table, notes)
    return table


def _set_notes(table: Table, notes: list[str]) -> None:
    """Raw hex goes under the table: folded into a cell it is unreadable."""
    if notes:
        table.caption = "\n".join(notes)
        table.caption_justify = "left"


def _slot_table(title: Text | str, host_column: bool = False) -> Table:
    table = Table(title=title, title_justify="left", expand=False)
    if host_column:
        table.add_column("host", justify="right")
    table.add_column("slot", justify="right")
    table.add_column("state", no_wrap=True)
    table.add_column("domain", overflow="fold")
    table.add_column("volume", overflow="fold")
    table.add_column("inbox", overflow="fold")
    table.add_column("outbox", overflow="fold")
    table.add_column("detail", overflow="fold")
    return table


def _add_slot_row(table: Table, slot: view.SlotReport, notes: list[str], host: int | None = None) -> None:
    extend = slot.extend
    details = [slot.verdict.detail] if slot.verdict.detail else []
    where = f"slot {slot.index}" if host is None else f"host {host} slot {slot.index}"
    for side, msg in (("inbox", slot.inbox), ("outbox", slot.outbox)):
        if msg.slot.kind in (Kind.INVALID, Kind.UNKNOWN):
            notes.append(f"{where} {side} raw: {msg.slot.raw.hex()}")
        if msg.slot.kind is Kind.INVALID and msg.slot.reason != slot.verdict.detail:
            details.append(f"{side}: {msg.slot.reason}")
    reply = slot.outbox.slot.message
    if extend and isinstance(reply, codec.Extend) and not reply.same_volume(extend):
        details.append(f"outbox volume {reply.volume} domain {reply.domain}")
    state = slot.verdict.state
    cells: list[str | Text] = [
        str(slot.index),
        Text(state.value, style=_STYLES.get(state, "")),
        str(extend.domain) if extend else "",
        str(extend.volume) if extend else "",
        slot.inbox.describe(),
        slot.outbox.describe(),
        "\n".join(details),
    ]
    if host is not None:
        cells.insert(0, str(host))
    table.add_row(*cells)


# decode

_WHITESPACE = re.compile(r"\s+")


def run_decode(args: argparse.Namespace) -> int:
    text = "".join(sys.stdin.read() if h == "-" else h for h in args.hex)
    text = _WHITESPACE.sub("", text)
    try:
        raw = bytes.fromhex(text)
    except ValueError as e:
        return _fail(f"not hex: {e}")
    if len(raw) == codec.MESSAGE_SIZE:
        message = view.MessageView(read_slot(raw))
        if args.json:
            _print_json({"schema_version": view.SCHEMA_VERSION, "type": "message", "message": message.to_json()})
        else:
            _console().print(_message_grid(message))
        return 0
    if len(raw) == codec.BLOCK_SIZE:
        block = _decoded_block(raw)
        if args.json:
            _print_json({"schema_version": view.SCHEMA_VERSION, "type": "block", "block": block})
        else:
            _print_block(raw, block)
        return 0
    return _fail(f"expected {codec.MESSAGE_SIZE} or {codec.BLOCK_SIZE} bytes, got {len(raw)}")


def _print_json(value: dict[str, Any]) -> None:
    json.dump(value, sys.stdout, indent=2)
    sys.stdout.write("\n")


def _message_grid(message: view.MessageView) -> Table:
    grid = Table.grid(padding=(0, 2))
    for key, value in message.to_json().items():
        if value is not None:
            grid.add_row(key, str(value))
    return grid


def _decoded_block(raw: bytes) -> dict[str, Any]:
    event = view.read_event(raw) if raw.startswith(codec.EVENT_MAGIC) else None
    stored, computed = codec.stored_checksum(raw), codec.checksum(raw)
    reserved = raw[codec.MESSAGES_PER_BLOCK * codec.MESSAGE_SIZE : codec.CHECKSUM_OFFSET]
    slots = []
    if event is None:
        for i in range(codec.MESSAGES_PER_BLOCK):
            data = codec.slot(raw, i)
            if data != codec.EMPTY_MESSAGE:
                slots.append({"slot": i, "message": view.MessageView(read_slot(data)).to_json()})
    return {
        "checksum": {"stored": stored, "computed": computed, "valid": stored == computed},
        "event": event.to_json() if event else None,
        "reserved": reserved.hex() if any(reserved) else None,
        "slots": slots,
    }


def _print_block(raw: bytes, block: dict[str, Any]) -> None:
    console = _console()
    if block["event"] is not None:
        console.print(f"event block: {view.read_event(raw).describe()}")
        return
    checksum = block["checksum"]
    state = "ok" if checksum["valid"] else "differs (fine for an outbox block, bad for an inbox block)"
    console.print(f"checksum stored {checksum['stored']}, computed {checksum['computed']}: {state}")
    if block["reserved"]:
        console.print(f"reserved slot: {block['reserved']}")
    table = Table(title=f"{len(block['slots'])} non-empty slots", title_justify="left")
    for name in ("slot", "kind", "domain", "volume", "size MiB", "detail"):
        table.add_column(name, overflow="fold")
    for entry in block["slots"]:
        msg = entry["message"]
        detail = msg["reason"] or (f"opcode {msg['opcode']!r}" if msg["opcode"] else "")
        if msg["kind"] in ("invalid", "unknown"):
            detail += f"\nraw {msg['raw']}"
        size = "" if msg["size_mb"] is None else str(msg["size_mb"])
        table.add_row(str(entry["slot"]), msg["kind"], msg["domain"] or "", msg["volume"] or "", size, detail)
    console.print(table)


# watch


def run_watch(args: argparse.Namespace) -> int:
    console = _console()
    stop = threading.Event()
    try:
        with view.AreaReader(args.inbox) as inbox, view.AreaReader(args.outbox) as outbox:
            if console.is_terminal:
                # The alternate screen is redrawn from its top-left corner:
                # nothing scrolls and nothing is erased first, so no flicker.
                with Live(console=console, auto_refresh=False, screen=True, vertical_overflow="crop") as live:
                    _watch_loop(args, inbox, outbox, stop, lambda r: live.update(r, refresh=True),
                                lambda: _terminal_rows(console))
            else:
                _watch_loop(args, inbox, outbox, stop, console.print)
    except KeyboardInterrupt:
        return 0
    except (directio.StorageError, OSError) as e:
        return _fail(str(e))
    return 0


def _watch_loop(
    args: argparse.Namespace,
    inbox: view.AreaReader,
    outbox: view.AreaReader,
    stop: threading.Event,
    show: Any,
    rows: Any = lambda: WATCH_ROWS,
) -> None:
    scanner = view.Scanner(inbox, outbox, args.max_hosts, args.host)
    scans = 0
    while True:
        report = scanner.scan()
        scans += 1
        show(watch_view(report, scans, rows()))
        if args.iterations is not None and scans >= args.iterations:
            return
        # Nothing sets the event: it is an interruptible wait, Ctrl-C ends it.
        stop.wait(args.interval)


def _terminal_rows(console: Console) -> int:
    """Slot rows that fit the terminal under the header and table frame."""
    return max(1, console.size.height - WATCH_CHROME)


def watch_view(report: view.Report, scans: int, max_rows: int = WATCH_ROWS) -> RenderableType:
    header = _header(report)
    header.add_row("scan", f"#{scans} at {time.strftime('%H:%M:%S')}")
    busy = report.busy
    table = _slot_table(f"{len(busy)} busy hosts", host_column=True)
    rows = 0
    notes: list[str] = []
    for host in busy:
        if not host.slots:  # a bad checksum over empty slots
            table.add_row(
                str(host.host),
                "",
                Text(State.INVALID_BLOCK.value, style="bold red"),
                "",
                "",
                "",
                "",
                _checksum_text(host),
            )
        for slot in host.slots:
            if slot.verdict.state in IDLE_STATES:
                continue
            if rows >= max_rows:
                break
            _add_slot_row(table, slot, notes, host.host)
            rows += 1
    hidden = sum(1 for h in busy for s in h.slots if s.verdict.state not in IDLE_STATES) - rows
    if hidden > 0:
        notes.append(f"... {hidden} more busy slots")
    _set_notes(table, notes)
    return Group(header, table)
