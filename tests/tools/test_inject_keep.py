"""A failed trial keeps its logs and history, not its disk images."""

from __future__ import annotations

import os
import pathlib
import types

import pytest
from xtnd.tools.inject import harness


def test_keep_copies_logs_and_leaves_disk_images_out(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(harness, "WORK_BASE", str(tmp_path / "base"))
    trial_dir = tmp_path / "rig-1234" / "slow-mailbox-trial1"
    (trial_dir / "fuse-host1").mkdir(parents=True)
    (trial_dir / "spm1.log").write_text("extend done\n")
    (trial_dir / "history.jsonl").write_text('{"ev": "sent"}\n')
    (trial_dir / "fuse-host1.log").write_text("")
    with open(trial_dir / "fuse-host1" / "disk", "wb") as f:  # sparse: no real space
        f.truncate(harness.KEEP_MAX_BYTES + 1)
    with open(trial_dir / "fuse-host1" / "small.bin", "wb") as f:
        f.truncate(harness.KEEP_MAX_BYTES)
    trial = types.SimpleNamespace(dir=str(trial_dir), rig=types.SimpleNamespace(workdir=str(tmp_path / "rig-1234")))

    dest = pathlib.Path(harness.keep(trial))  # type: ignore[arg-type]

    assert dest == tmp_path / "base" / "failed" / "rig-1234-slow-mailbox-trial1"
    assert (dest / "spm1.log").read_text() == "extend done\n"
    assert (dest / "history.jsonl").exists() and (dest / "fuse-host1.log").exists()
    assert (dest / "fuse-host1" / "small.bin").stat().st_size == harness.KEEP_MAX_BYTES
    assert not os.path.exists(dest / "fuse-host1" / "disk")
    skipped = (dest / harness.SKIPPED).read_text().splitlines()
    assert skipped[1:] == [f"fuse-host1/disk {harness.KEEP_MAX_BYTES + 1}"]


def test_keep_without_large_files_writes_no_list(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(harness, "WORK_BASE", str(tmp_path / "base"))
    trial_dir = tmp_path / "rig" / "t"
    trial_dir.mkdir(parents=True)
    (trial_dir / "spm1.log").write_text("x\n")
    trial = types.SimpleNamespace(dir=str(trial_dir), rig=types.SimpleNamespace(workdir=str(tmp_path / "rig")))
    dest = pathlib.Path(harness.keep(trial))  # type: ignore[arg-type]
    assert (dest / "spm1.log").exists()
    assert not (dest / harness.SKIPPED).exists()
