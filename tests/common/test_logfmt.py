"""logfmt fields: completion lines quote what needs it and read back exactly."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from xtnd.common import logfmt
from xtnd.hsm import metrics
from xtnd.tools import stats_cli

MiB = 1024**2


def test_quoting() -> None:
    assert logfmt.value("web1") == "web1"
    assert logfmt.value("my vm") == '"my vm"'
    assert logfmt.value('say "hi"') == '"say \\"hi\\""'
    assert logfmt.value("") == '""'
    assert logfmt.value("a=b") == '"a=b"'
    assert logfmt.value("line\nbreak") == '"line\\nbreak"'
    assert logfmt.parse('vm="my vm" drive=vda x="a=b c" y=') == {"vm": "my vm", "drive": "vda", "x": "a=b c", "y": ""}


def record(name: str) -> metrics.ExtendRecord:
    return metrics.ExtendRecord(
        "u", name, "vda", "d", "v", "threshold", 16 * MiB, 32 * MiB, 1.0, 1.01, 1.2, 1.3, 1.35, False
    )


@given(st.text())
def test_parse_line_round_trips_any_vm_name(name: str) -> None:
    line = "2026-11-29 04:00:01,123 INFO (monitor) [xtnd.hsm] " + record(name).line()
    assert "\n" not in line and "\r" not in line
    fields = metrics.parse_line(line)
    assert fields["vm"] == name
    assert (fields["drive"], fields["old_mb"], fields["total_ms"], fields["resumed"]) == ("vda", "16", "350.0", "no")
    # The stats command reads the same line.
    sample = stats_cli.parse_line(line)
    assert sample is not None and sample.phases["total"] == 350.0


@given(st.dictionaries(st.from_regex(r"[a-z_]{1,8}", fullmatch=True), st.text(), max_size=5))
def test_fields_round_trip(kv: dict[str, str]) -> None:
    assert logfmt.parse(logfmt.fields(**kv)) == kv
