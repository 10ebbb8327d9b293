"""The SPM daemon's safety at start and exit: children tied to its life,
the lease kept until every LVM child of ours is gone."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

from xtnd.tools.rig.spmd import write_json


def test_refuses_without_pdeathsig(workdir: str) -> None:
    """Without setpriv no child can be tied to the daemon: refuse to start."""
    storage_config = os.path.join(workdir, "storage.json")
    write_json(storage_config, {"domains": {}})
    config = os.path.join(workdir, "spm.conf")
    with open(config, "w") as f:
        f.write(f"[spm]\nhost_id = 1\nmaster_domain = {uuid.uuid4()}\nstorage_config = {storage_config}\n")
    empty = os.path.join(workdir, "bin")
    os.mkdir(empty)
    result = subprocess.run(
        [sys.executable, "-m", "xtnd.tools.spm_cli", "--config", config],
        env={**os.environ, "PATH": empty},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1, result.stderr
    assert "refusing to start: setpriv (util-linux) not found" in result.stderr
    assert "Traceback" not in result.stderr
