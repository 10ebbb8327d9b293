"""Where this host finds its storage domains: /etc/xtnd/storage.json.

LVM commands only ever look at the PVs of the domain at hand (see
xtnd.lvm.runner), so a host must know them. The file maps each domain UUID
to its PVs (block) or its root directory (file):

    {
      "activation": "auto",
      "domains": {
        "8adbc85e-e554-4ae0-b318-8a5465fe5fe1": {"pvs": ["/dev/mapper/36001405a"]},
        "1b6a0d4c-...": {"root": "/srv/xtnd"}
      }
    }

"activation" is "auto" (device-mapper if the kernel has it), "dm" or
"loop". ``xtnd domain create`` adds the new domain here; XTND_STORAGE_CONFIG
or the CLI's --storage-config names another file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import uuid as uuidlib
from typing import Any

from .domain import Domain, open_domain
from .errors import DomainNotFound

DEFAULT_PATH = "/etc/xtnd/storage.json"
ENV = "XTND_STORAGE_CONFIG"


def default_path() -> str:
    return os.environ.get(ENV, DEFAULT_PATH)


@dataclasses.dataclass
class HostConfig:
    path: str
    activation: str = "auto"
    domains: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

    @classmethod
    def load(cls, path: str | None = None) -> HostConfig:
        path = path or default_path()
        try:
            with open(path) as f:
                data = json.load(f)
        except FileNotFoundError:
            return cls(path)
        return cls(path, data.get("activation", "auto"), dict(data.get("domains", {})))

    def save(self) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"activation": self.activation, "domains": self.domains}, f, indent=2)
            f.write("\n")
        os.rename(tmp, self.path)

    def add_block(self, uuid: uuidlib.UUID, pvs: list[str]) -> None:
        self.domains[str(uuid)] = {"pvs": list(pvs)}

    def add_file(self, uuid: uuidlib.UUID, root: str) -> None:
        self.domains[str(uuid)] = {"root": os.path.abspath(root)}

    def open(self, uuid: uuidlib.UUID | str, pvs: list[str] | None = None, root: str | None = None) -> Domain:
        """Open a domain; explicit pvs or root win over the file."""
        if not pvs and not root:
            entry = self.domains.get(str(uuid))
            if entry is None:
                raise DomainNotFound(uuid, f"not in {self.path}; give its PVs or root")
            pvs = entry.get("pvs")
            root = entry.get("root")
        return open_domain(uuid, pvs=pvs or (), root=root, activation=self.activation)
