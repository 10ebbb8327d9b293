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
from .errors import DomainNotFound, StorageConfigError

ACTIVATIONS = ("auto", "dm", "loop")

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
        """The file's domains; a missing file is an empty config. Anything
        unusable raises StorageConfigError naming the file and the entry."""
        path = path or default_path()
        try:
            with open(path) as f:
                data = json.load(f)
        except FileNotFoundError:
            return cls(path)
        except OSError as e:
            raise StorageConfigError(path, f"cannot read: {e.strerror or e}") from None
        except ValueError as e:
            raise StorageConfigError(path, f"not JSON: {e}") from None
        if not isinstance(data, dict):
            raise StorageConfigError(path, "not a JSON object")
        activation = data.get("activation", "auto")
        if activation not in ACTIVATIONS:
            raise StorageConfigError(path, f"activation {activation!r}: must be one of {', '.join(ACTIVATIONS)}")
        domains = data.get("domains", {})
        if not isinstance(domains, dict):
            raise StorageConfigError(path, '"domains" is not an object')
        for key, entry in domains.items():
            _check_entry(path, key, entry)
        return cls(path, activation, dict(domains))

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

    def open(
        self,
        uuid: uuidlib.UUID | str,
        pvs: list[str] | None = None,
        root: str | None = None,
        writable: bool = False,
        timeout: float | None = None,
    ) -> Domain:
        """Open a domain; explicit pvs or root win over the file.

        Read-only LVM metadata unless writable (see open_domain)."""
        if not pvs and not root:
            entry = self.domains.get(str(uuid))
            if entry is None:
                raise DomainNotFound(uuid, f"not in {self.path}; give its PVs or root")
            pvs = entry.get("pvs")
            root = entry.get("root")
        return open_domain(
            uuid, pvs=pvs or (), root=root, activation=self.activation, writable=writable, timeout=timeout
        )


def _check_entry(path: str, key: str, entry: Any) -> None:
    try:
        uuidlib.UUID(key)
    except ValueError:
        raise StorageConfigError(path, f"domain {key!r}: not a UUID") from None
    if not isinstance(entry, dict):
        raise StorageConfigError(path, f"domain {key}: not an object")
    pvs, root = entry.get("pvs"), entry.get("root")
    if (pvs is None) == (root is None):
        raise StorageConfigError(path, f'domain {key}: needs exactly one of "pvs", "root"')
    if pvs is not None and not (isinstance(pvs, list) and pvs and all(isinstance(p, str) for p in pvs)):
        raise StorageConfigError(path, f'domain {key}: "pvs" must be a list of device paths')
    if root is not None and not isinstance(root, str):
        raise StorageConfigError(path, f'domain {key}: "root" must be a directory path')
