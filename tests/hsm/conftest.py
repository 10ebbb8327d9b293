"""Fixtures for HSM tests: libvirt daemons, its event loop, the guest rig,
the storage pool of xtnd.tools.rig.hsmrig and a host for its SPM."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import libvirt
import pytest
from xtnd.hsm.libvirtconn import EventLoop
from xtnd.tools.rig import guest, hsmrig
from xtnd.tools.rig.sanlockd import SanlockDaemon


@pytest.fixture(scope="session")
def libvirt_events() -> Iterator[EventLoop]:
    """libvirt's event loop, running before any connection is opened."""
    loop = EventLoop(name="test-libvirt-events")
    loop.start()
    yield loop
    loop.stop()


@pytest.fixture(scope="session")
def libvirtd() -> None:
    """virtlogd and libvirtd running (started here if needed)."""
    if os.geteuid() != 0:
        pytest.skip("needs root (libvirtd, loop devices)")
    try:
        guest.start_libvirt()
    except guest.RigUnavailable as e:
        pytest.skip(f"libvirt unavailable: {e}")


@pytest.fixture(scope="session")
def rig(libvirtd: None) -> guest.Rig:
    """The guest kernel and initramfs (built once, cached in /var/tmp)."""
    try:
        return guest.build_rig()
    except guest.RigUnavailable as e:
        pytest.skip(f"guest rig unavailable: {e}")


@pytest.fixture
def conn(libvirtd: None, libvirt_events: EventLoop) -> Iterator[libvirt.virConnect]:
    """A plain qemu:///system connection that receives events."""
    c = libvirt.open("qemu:///system")
    yield c
    c.close()


@pytest.fixture
def loop_disk(workdir: str) -> Iterator[guest.LoopDisk]:
    """A 64 MiB growable loop device standing in for a thin LV."""
    disk = guest.LoopDisk(os.path.join(workdir, "lv"), 64 * 1024**2)
    yield disk
    disk.detach()


@pytest.fixture
def pool(workdir: str, need_root: None, libvirtd: None) -> Iterator[hsmrig.Pool]:
    """A master block domain on a loop PV (hsmrig.pool), removed after."""
    with hsmrig.pool(workdir) as p:
        yield p


@pytest.fixture
def spm_host(sanlock_hosts: Callable[[int], list[SanlockDaemon]]) -> SanlockDaemon:
    """A simulated host (its own sanlock daemon) for the SPM daemon."""
    [host] = sanlock_hosts(1)
    return host
