"""LVM commands, reports, extend and LV activation.

runner.py runs every LVM command (device list, no device-mapper mode, JSON
reports, command history), as a process or through shell.py's long-lived
LVM shell, with sysdir.py's configuration; vg.py and lv.py hold one function per
subcommand; activation.py maps LVs with device-mapper or loop devices.
"""

from .activation import Activator, DeviceMapperActivator, LoopActivator, make_activator
from .errors import ActivationError, LVMError, LVNotFound, MultiSegmentLV, NotEnoughFreeExtents, VGNotFound
from .history import CommandHistory, CommandRecord
from .lv import LVInfo, Segment, change_tags, extend, lv_info, lvcreate, lvextend, lvremove, lvs
from .runner import Runner, device_mapper_available
from .shell import LvmShell, ShellError
from .vg import PVInfo, VGInfo, pvcreate, vg_change_tags, vg_info, vgcreate, vgextend, vgremove, vgs

__all__ = [
    "ActivationError",
    "Activator",
    "CommandHistory",
    "CommandRecord",
    "DeviceMapperActivator",
    "LVInfo",
    "LVMError",
    "LvmShell",
    "LVNotFound",
    "LoopActivator",
    "MultiSegmentLV",
    "NotEnoughFreeExtents",
    "PVInfo",
    "Runner",
    "Segment",
    "ShellError",
    "VGInfo",
    "VGNotFound",
    "change_tags",
    "device_mapper_available",
    "extend",
    "lv_info",
    "lvcreate",
    "lvextend",
    "lvremove",
    "lvs",
    "make_activator",
    "pvcreate",
    "vg_change_tags",
    "vg_info",
    "vgcreate",
    "vgextend",
    "vgremove",
    "vgs",
]
