"""Only the SPM writes LVM metadata: every other path opens domains read-only.

The HSM (refresh, activation), `xtnd volume prepare/teardown` and the CLI's
reports get a runner on which LVM itself refuses metadata changes. Each
path is opened the way its code opens it, then made to attempt writes.
"""

from __future__ import annotations

import argparse
import os
import uuid

import pytest
from xtnd import lvm, storage
from xtnd.hsm.volumes import StorageVolumes
from xtnd.tools import domain_cli, volume_host_cli

MiB = 1024**2
EXTENT = 4 * MiB


def _args(config: str, domain: uuid.UUID, volume: uuid.UUID | None = None) -> argparse.Namespace:
    return argparse.Namespace(storage_config=config, domain=domain, uuid=volume, pv=[], path=None)


def _attempt_writes(opened: storage.Domain, vg: str, vol: uuid.UUID) -> None:
    assert isinstance(opened, storage.BlockDomain)
    runner = opened.runner
    attempts = [
        lambda: lvm.lvcreate(runner, vg, "intruder", EXTENT),
        lambda: lvm.lvextend(runner, vg, str(vol), 32 * MiB),
        lambda: lvm.change_tags(runner, vg, str(vol), add=("intruder",)),
        lambda: lvm.lvremove(runner, vg, str(vol)),
        lambda: opened.create_volume(uuid.uuid4(), 100 * MiB, "raw"),
        lambda: opened.remove_volume(vol),
    ]
    for attempt in attempts:
        with pytest.raises(lvm.LVMError, match="prohibited while --readonly"):
            attempt()


def test_non_spm_paths_cannot_write(domain: storage.BlockDomain, pvs: list[str], workdir: str) -> None:
    config = storage.HostConfig(os.path.join(workdir, "storage.json"), activation="loop")
    config.add_block(domain.uuid, pvs[:1])
    config.save()
    vol = uuid.uuid4()
    domain.create_volume(vol, 100 * MiB, "qcow2", initial_size=16 * MiB)
    before = lvm.lvs(domain.runner, domain.vg)
    paths = {
        "hsm": StorageVolumes(config.path).domain(domain.uuid),
        "volume prepare": volume_host_cli._open(_args(config.path, domain.uuid, vol)),
        "cli reports": domain_cli.LocalBackend(config)._open(_args(config.path, domain.uuid), domain.uuid),
        "host config": config.open(domain.uuid),
    }
    for name, opened in paths.items():
        _attempt_writes(opened, domain.vg, vol)
        # What these paths are for still works: reports, activation, refresh.
        assert opened.volume_info(vol).size == 16 * MiB, name
        device = opened.prepare_volume(vol)
        assert opened.refresh_volume(vol) == 16 * MiB, name
        assert os.path.exists(device)
        opened.teardown_volume(vol)
    assert lvm.lvs(domain.runner, domain.vg) == before
    # The SPM and commands holding the lease open it writable.
    writable = config.open(domain.uuid, writable=True)
    writable.remove_volume(vol)
    assert str(vol) not in {lv.name for lv in lvm.lvs(domain.runner, domain.vg)}
