"""`xtnd volume prepare/teardown` on a real block domain (loop-mapped LVs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import pytest
from xtnd.hsm import links
from xtnd.lvm import loop
from xtnd.tools.rig import hsmrig

MiB = 1024**2

pytestmark = pytest.mark.root


def xtnd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "xtnd.tools.cli", *args], capture_output=True, text=True)


def test_prepare_teardown(workdir: str, need_root: None) -> None:
    with hsmrig.pool(workdir) as p:
        vol = uuid.uuid4()
        p.domain.create_volume(vol, 1024 * MiB, initial_size=16 * MiB)
        common = ["--domain", str(p.uuid), "--uuid", str(vol), "--storage-config", p.storage_config]
        common += ["--run-dir", p.run_dir]
        r = xtnd("volume", "prepare", *common, "--json")
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)
        path = links.link_path(p.uuid, vol, p.run_dir)
        assert out["path"] == path
        assert os.path.realpath(path) == out["device"]
        assert loop.size(path) == 16 * MiB
        assert links.parse(path, p.run_dir) == (p.uuid, vol)
        # Idempotent: a second prepare gives the same device.
        again = json.loads(xtnd("volume", "prepare", *common, "--json").stdout)
        assert again["device"] == out["device"]

        r = xtnd("volume", "teardown", *common)
        assert r.returncode == 0, r.stderr
        assert not os.path.lexists(path)
        assert p.domain.volume_info(vol).path is None

        r = xtnd("volume", "prepare", "--domain", str(p.uuid), "--uuid", str(uuid.uuid4()),
                 "--storage-config", p.storage_config, "--run-dir", p.run_dir)  # fmt: skip
        assert r.returncode == 1 and "xtnd: error:" in r.stderr


@pytest.mark.parametrize("shell", [True, False])
def test_refresh_after_extend_elsewhere(workdir: str, need_root: None, shell: bool) -> None:
    """The HSM's refresh sees an extend made by another process (the SPM),
    through its LVM shell ([lvm] shell = true) or a process per command."""
    from xtnd import lvm
    from xtnd.hsm.volumes import StorageVolumes

    with hsmrig.pool(workdir) as p:
        vol = uuid.uuid4()
        p.domain.create_volume(vol, 1024 * MiB, initial_size=16 * MiB)
        sh = lvm.LvmShell("test-hsm-lvm") if shell else None
        volumes = StorageVolumes(p.storage_config, p.run_dir, sh)
        try:
            domain = volumes.domain(p.uuid)
            links.create(p.uuid, vol, domain.prepare_volume(vol), p.run_dir)
            spm = lvm.Runner(p.domain.runner.devices)  # another process each time
            for size in (20 * MiB, 32 * MiB):
                lvm.lvextend(spm, str(p.uuid), str(vol), size, alloc="contiguous")
                assert volumes.refresh(p.uuid, vol) == size
            if sh is not None:
                assert sh.starts == 1 and sh.commands >= 2
        finally:
            volumes.domain(p.uuid).teardown_volume(vol)
            links.remove(p.uuid, vol, p.run_dir)
            if sh is not None:
                sh.close()
