"""An SPM managing several block domains: one whose storage hangs or is
missing fails alone, with a clear error, and is tried again later."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable

import pytest
from xtnd import lvm, storage
from xtnd.mailbox.hsm import ExtendFailed
from xtnd.storage import constants as c
from xtnd.tools.rig import loops, sanlockd
from xtnd.tools.rig.spmd import EXTENT, MiB, Pool, SpmProcess, vg_locked
from xtnd.tools.rig.wait import wait_for


def _volume(domain: storage.BlockDomain) -> uuid.UUID:
    vol = uuid.uuid4()
    tags = (c.TAG_VOLUME, f"{c.TAG_CAPACITY}{100 * MiB}", f"{c.TAG_FORMAT}qcow2")
    lvm.lvcreate(domain.runner, domain.vg, str(vol), 8 * MiB, tags)
    return vol


def test_hung_and_missing_domains_fail_alone(
    pool: Pool, sanlock_hosts: Callable[[int], list[sanlockd.SanlockDaemon]], workdir: str
) -> None:
    other = os.path.join(workdir, "other")
    os.mkdir(other)
    with loops.loop_pvs(other, count=1) as [pv]:
        hung = storage.create_block_domain(uuid.uuid4(), [pv], extent_size=EXTENT)
        missing = uuid.uuid4()
        try:
            hostcfg = storage.HostConfig.load(pool.storage_config)
            hostcfg.add_block(hung.uuid, [pv])
            hostcfg.add_block(missing, [os.path.join(workdir, "no-such-pv")])
            hostcfg.save()
            vol, hung_vol = _volume(pool.domain), _volume(hung)
            [host] = sanlock_hosts(1)
            config = pool.spm_config(
                1, **{"spm.domains": "*", "lvm.command_timeout": "6", "lvm.open_retry_interval": "3"}
            )
            hsm = pool.hsm(host_id=2)
            hsm.start()
            try:
                # Every LVM command on the hung domain's VG waits (LVM's own lock).
                with vg_locked(hung.vg):
                    spm = SpmProcess(host, config, os.path.join(workdir, "spm1.log"))
                    spm.wait_serving()
                    # Served while the hung domain's open still waits.
                    assert hsm.submit(pool.uuid, vol, 12 * MiB).result(timeout=60) == 12 * MiB
                    assert f"cannot open domain domain={hung.uuid}" not in spm.log()
                    with pytest.raises(ExtendFailed):
                        hsm.submit(hung.uuid, hung_vol, 12 * MiB).result(timeout=60)
                    spm.wait_log(f"cannot open domain domain={hung.uuid} .*timed out after 6")
                    assert hsm.submit(pool.uuid, vol, 16 * MiB).result(timeout=60) == 16 * MiB
                # The missing PV: a clear error, at once.
                spm.wait_log(f"cannot open domain domain={missing} .*no-such-pv")

                def served() -> bool:
                    try:
                        return hsm.submit(hung.uuid, hung_vol, 12 * MiB).result(timeout=60) == 12 * MiB
                    except ExtendFailed:
                        return False

                # Tried again after open_retry_interval, and served.
                wait_for(served, timeout=60, interval=0.5, what="the hung domain served after its storage is back")
                assert spm.log().count(f"domain opened domain={hung.uuid}") == 1
            finally:
                hsm.stop()
            assert lvm.lv_info(hung.runner, hung.vg, str(hung_vol)).size == 12 * MiB
            assert pool.lv_size(vol) == 16 * MiB
            assert spm.terminate() == 0
        finally:
            hung.deactivate_special()
            lvm.vgremove(hung.runner, hung.vg)
