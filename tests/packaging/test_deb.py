"""The Debian package: build, lintian, apt install, run from /usr/bin, remove.

The package is installed with the machine's own apt and dpkg, inside a
private mount namespace whose /usr, /etc and /var are copy-on-write
overlays of the machine's: the real install and removal run, and no other
process ever sees the package (a venv made with --system-site-packages
would otherwise import /usr/lib/python3/dist-packages/xtnd while it is
there; tools/run.sh also puts the editable install's finder first, which
the test checks from inside). The dependencies are the Debian packages
tools/run.sh installs, so apt downloads nothing.
"""

from __future__ import annotations

import gzip
import io
import os
import re
import subprocess
import sys
import tarfile
import tomllib

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EMPTY_MESSAGE = "00" * 64
with open(os.path.join(REPO, "pyproject.toml"), "rb") as _f:
    VERSION = tomllib.load(_f)["project"]["version"]

INSIDE = r"""
set -eu
for d in usr etc var; do  # var last: the upper dirs live under /var/tmp
    mkdir -p "$W/$d-up" "$W/$d-work"
    mount -t overlay overlay -o "lowerdir=/$d,upperdir=$W/$d-up,workdir=$W/$d-work" "/$d"
done
export DEBIAN_FRONTEND=noninteractive
echo "== install"
apt-get install -y -q --no-install-recommends "$DEB" 2>&1
echo "== version"
/usr/bin/xtnd --version
echo "== decode"
/usr/bin/xtnd mailbox decode "$EMPTY"
echo "== system module"
/usr/bin/python3 -I -c 'import xtnd.tools.cli as m; print(m.__file__)'
echo "== venv module"
"$VENV_PYTHON" -c 'import xtnd.tools.cli as m; print(m.__file__)'
echo "== verify"
systemd-analyze verify /lib/systemd/system/xtnd-spm.service /lib/systemd/system/xtnd-hsm.service 2>&1
echo "== man"
man -w xtnd
echo "== conffiles"
dpkg-query -W -f='${Conffiles}\n' xtnd
echo "== purge"
apt-get purge -y -q xtnd 2>&1
echo "== after"
ls /usr/bin/xtnd /usr/lib/python3/dist-packages/xtnd /lib/systemd/system/xtnd-spm.service 2>&1 || true
echo "== end"
"""


def sections(output: str) -> dict[str, str]:
    parts = re.split(r"^== (.+)$", output, flags=re.M)
    return {parts[i]: parts[i + 1].strip() for i in range(1, len(parts) - 1, 2)}


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory) -> str:
    out = tmp_path_factory.mktemp("dist")
    build = subprocess.run(
        [sys.executable, os.path.join(REPO, "packaging", "build_deb.py"), "--out", str(out)],
        capture_output=True,
        text=True,
        check=True,
    )
    path = build.stdout.splitlines()[-1]
    assert os.path.basename(path) == f"xtnd_{VERSION}_all.deb"
    return path


def field(deb: str, name: str) -> str:
    return subprocess.run(["dpkg-deb", "-f", deb, name], capture_output=True, text=True, check=True).stdout.strip()


def test_contents(deb: str) -> None:
    listing = subprocess.run(["dpkg-deb", "-c", deb], capture_output=True, text=True, check=True).stdout
    for path in (
        "./usr/bin/xtnd",
        "./usr/lib/python3/dist-packages/xtnd/spm/daemon.py",
        "./usr/lib/python3/dist-packages/xtnd/tools/cli.py",
        "./lib/systemd/system/xtnd-spm.service",
        "./lib/systemd/system/xtnd-hsm.service",
        "./usr/lib/tmpfiles.d/xtnd.conf",
        "./etc/xtnd/spm.conf",
        "./etc/xtnd/hsm.conf",
        "./etc/xtnd/spm.conf.d/50-local.conf.example",
        "./usr/share/doc/xtnd/README.md",
        "./usr/share/man/man1/xtnd.1.gz",
        "./usr/share/bash-completion/completions/xtnd",
        "./usr/share/xtnd/grafana/xtnd-dashboard.json",
        "./usr/lib/python3/dist-packages/xtnd/tools/rig/guest_init.sh",  # package data (xtnd hsm bench)
    ):
        assert f" {path}\n" in listing or listing.endswith(f" {path}"), path
    assert "__pycache__" not in listing and "/tests/" not in listing and "tools/run.sh" not in listing
    depends = [d.strip() for d in field(deb, "Depends").split(",")]
    for pkg in ("python3-construct", "python3-libvirt", "python3-sanlock", "python3-rich",
                "python3-prometheus-client", "lvm2", "sanlock", "qemu-utils"):  # fmt: skip
        assert pkg in depends, pkg
    assert all(re.fullmatch(r"[a-z0-9][a-z0-9.+-]+( \(>= [\d.]+\))?", d) for d in depends), depends


def test_lintian_no_errors(deb: str) -> None:
    result = subprocess.run(["lintian", "--tag-display-limit", "0", deb], capture_output=True, text=True)
    errors = [ln for ln in result.stdout.splitlines() if ln.startswith("E:")]
    assert not errors, result.stdout
    assert result.returncode == 0, result.stdout + result.stderr


def test_man_page_and_completion_cover_every_command(deb: str) -> None:
    data = subprocess.run(["dpkg-deb", "--fsys-tarfile", deb], capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        man = gzip.decompress(tar.extractfile("./usr/share/man/man1/xtnd.1.gz").read()).decode()  # type: ignore[union-attr]
        completion = tar.extractfile("./usr/share/bash-completion/completions/xtnd").read().decode()  # type: ignore[union-attr]
    for command in ("xtnd status", "xtnd stats", "xtnd spm log\\-level", "xtnd hsm log\\-level", "xtnd volume create"):
        assert f".SS {command}" in man, command
    assert '"spm log-level")' in completion and "--spm-config" in completion
    check = subprocess.run(["bash", "-n"], input=completion, text=True, capture_output=True)
    assert check.returncode == 0, check.stderr


def test_apt_install_run_remove(deb: str, workdir: str, need_root: None) -> None:
    env = {
        **os.environ,
        "W": os.path.join(workdir, "overlay"),
        "DEB": deb,
        "EMPTY": EMPTY_MESSAGE,
        "VENV_PYTHON": sys.executable,
    }
    result = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", INSIDE],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    out = sections(result.stdout)
    assert result.returncode == 0 and "end" in out, result.stdout[-4000:] + result.stderr[-2000:]
    assert "Setting up xtnd" in out["install"]
    assert out["version"] == f"xtnd {VERSION}"
    assert "empty" in out["decode"]
    assert out["system module"] == "/usr/lib/python3/dist-packages/xtnd/tools/cli.py"
    assert out["venv module"] == os.path.join(REPO, "tools", "cli.py"), "the editable install must win"
    assert out["verify"] == "", out["verify"]
    assert out["man"] == "/usr/share/man/man1/xtnd.1.gz"
    assert "/etc/xtnd/spm.conf" in out["conffiles"] and "/etc/xtnd/hsm.conf" in out["conffiles"]
    assert out["after"].count("No such file or directory") == 3, out["after"]
    # Nothing of it outside the namespace.
    assert not os.path.exists("/usr/bin/xtnd") and not os.path.exists("/usr/lib/python3/dist-packages/xtnd")
