"""Build xtnd_VERSION_all.deb from this checkout, with Debian's own tools only.

    python packaging/build_deb.py --out DIR     (prints the .deb's path last)

No debhelper: the tree is laid out here and packed with dpkg-deb
(--root-owner-group). The Python areas (common/, spm/, ...) go to
/usr/lib/python3/dist-packages/xtnd/<area>/ as the code imports them
(xtnd.<area>, an implicit namespace package), with a dist-info so
``xtnd --version`` reads the version. Dependencies are Debian packages:
pyproject's dependencies mapped to their python3-* names, plus the tools
the daemons run. Nothing is downloaded at install time.
"""

from __future__ import annotations

import argparse
import email.message
import gzip
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.join(REPO, "packaging")
AREAS = ("common", "mailbox", "spm", "hsm", "lvm", "storage", "tools")
# pyproject dependency -> Debian package.
DEBIAN_NAMES = {
    "aiohttp": "python3-aiohttp",
    "construct": "python3-construct",
    "libvirt-python": "python3-libvirt",
    "pyudev": "python3-pyudev",
    "rich": "python3-rich",
    "prometheus-client": "python3-prometheus-client",
}
# Imported but not on PyPI (Debian only), and the programs the daemons run.
EXTRA_DEPENDS = [
    "python3 (>= 3.11)",
    "python3-sanlock",
    "lvm2",
    "sanlock",
    "qemu-utils",
]
RECOMMENDS = ["python3-matplotlib", "libvirt-daemon-system", "python3-numpy", "python3-fusepy"]
ENTRY = """#!/usr/bin/python3
# xtnd command line (Debian package); the code is in the xtnd.* modules.
import sys

from xtnd.tools.cli import main

sys.exit(main())
"""


def project() -> dict[str, object]:
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["project"]  # type: ignore[no-any-return]


def depends(proj: dict[str, object]) -> list[str]:
    out = []
    for requirement in proj["dependencies"]:  # type: ignore[attr-defined]
        name = re.split(r"[<>=!~ \[]", requirement, maxsplit=1)[0].lower()
        if name not in DEBIAN_NAMES:
            raise SystemExit(f"build_deb: no Debian package known for dependency {name!r}: add it to DEBIAN_NAMES")
        out.append(DEBIAN_NAMES[name])
    return out + EXTRA_DEPENDS


def copy(src: str, dst: str, mode: int = 0o644) -> None:
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    shutil.copyfile(src, dst)
    os.chmod(dst, mode)


def write(dst: str, data: str | bytes, mode: int = 0o644) -> None:
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    with open(dst, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    os.chmod(dst, mode)


def gz(data: str) -> bytes:
    return gzip.compress(data.encode(), compresslevel=9, mtime=0)


def generated(what: str, *args: str) -> str:
    """packaging/manpage.py output, run with this interpreter (it imports xtnd)."""
    cmd = [sys.executable, os.path.join(HERE, "manpage.py"), what, *args]
    return subprocess.run(cmd, check=True, capture_output=True, text=True, cwd="/").stdout


def package_data() -> dict[str, list[str]]:
    """pyproject's [tool.setuptools.package-data]: package -> file names."""
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        tool = tomllib.load(f)["tool"]["setuptools"]
    return dict(tool.get("package-data", {}))


def layout(root: str, version: str, proj: dict[str, object]) -> list[str]:
    """Fill root with the package's files; return the conffiles."""
    site = os.path.join(root, "usr/lib/python3/dist-packages")
    data = package_data()
    for area in AREAS:
        for dirpath, dirnames, filenames in os.walk(os.path.join(REPO, area)):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            rel = os.path.relpath(dirpath, REPO)
            package = "xtnd." + rel.replace("/", ".")
            for name in filenames:
                if name.endswith(".py") or name in data.get(package, []):
                    mode = 0o755 if name.endswith(".sh") else 0o644
                    copy(os.path.join(dirpath, name), os.path.join(site, "xtnd", rel, name), mode)
    copy(os.path.join(HERE, "debian", "lintian-overrides"), os.path.join(root, "usr/share/lintian/overrides/xtnd"))
    meta = email.message.Message()
    meta["Metadata-Version"] = "2.1"
    meta["Name"] = "xtnd"
    meta["Version"] = version
    meta["Summary"] = str(proj["description"])
    meta["License"] = "GPL-2.0-or-later"
    info = os.path.join(site, f"xtnd-{version}.dist-info")
    write(os.path.join(info, "METADATA"), meta.as_string())
    write(os.path.join(info, "INSTALLER"), "dpkg\n")
    write(os.path.join(root, "usr/bin/xtnd"), ENTRY, 0o755)
    for unit in ("xtnd-spm.service", "xtnd-hsm.service"):
        copy(os.path.join(REPO, "systemd", unit), os.path.join(root, "lib/systemd/system", unit))
    copy(os.path.join(REPO, "systemd", "xtnd.tmpfiles"), os.path.join(root, "usr/lib/tmpfiles.d/xtnd.conf"))
    conffiles = []
    etc = os.path.join(REPO, "etc")
    for dirpath, _dirs, filenames in os.walk(etc):
        for name in sorted(filenames):
            rel = os.path.relpath(os.path.join(dirpath, name), etc)
            copy(os.path.join(dirpath, name), os.path.join(root, "etc", rel))
            conffiles.append(f"/etc/{rel}")
    doc = os.path.join(root, "usr/share/doc/xtnd")
    copy(os.path.join(REPO, "README.md"), os.path.join(doc, "README.md"))
    copy(os.path.join(REPO, "systemd", "README.md"), os.path.join(doc, "systemd.md"))
    copy(os.path.join(HERE, "debian", "copyright"), os.path.join(doc, "copyright"))
    write(os.path.join(doc, "changelog.gz"), gz(changelog(version)))
    write(os.path.join(root, "usr/share/man/man1/xtnd.1.gz"), gz(generated("man", version)))
    write(os.path.join(root, "usr/share/bash-completion/completions/xtnd"), generated("completion"))
    grafana = os.path.join(root, "usr/share/xtnd/grafana/xtnd-dashboard.json")
    copy(os.path.join(REPO, "grafana", "xtnd-dashboard.json"), grafana)
    return sorted(conffiles)


def changelog(version: str) -> str:
    return (
        f"xtnd ({version}) unstable; urgency=medium\n\n"
        "  * Built from the xtnd source tree (bash tools/run.sh package).\n\n"
        " -- xtnd maintainers <xtnd@example.org>  Sun, 29 Nov 2026 00:00:00 +0000\n"
    )


def control(version: str, proj: dict[str, object], size_kb: int) -> str:
    return (
        "Package: xtnd\n"
        f"Version: {version}\n"
        "Architecture: all\n"
        "Maintainer: xtnd maintainers <xtnd@example.org>\n"
        f"Installed-Size: {size_kb}\n"
        f"Depends: {', '.join(depends(proj))}\n"
        f"Recommends: {', '.join(RECOMMENDS)}\n"
        "Section: admin\n"
        "Priority: optional\n"
        "Homepage: https://github.com/xtnd/xtnd\n"
        "Description: keep thin-provisioned VM disks on shared LVM from filling\n"
        " An HSM daemon on every hypervisor host watches the qcow2 disks of its\n"
        " VMs through libvirt and asks for space before they fill; one SPM\n"
        " daemon, holding a sanlock lease, extends the logical volumes and\n"
        " answers through an on-disk mailbox compatible with vdsm's.\n"
        " .\n"
        " Includes systemd units, sample configurations, Prometheus metrics,\n"
        " a status command and extend latency statistics.\n"
    )


def md5sums(root: str, conffiles: set[str]) -> str:
    lines = []
    for dirpath, _dirs, files in os.walk(root):
        for name in sorted(files):
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            if rel.startswith("DEBIAN/") or f"/{rel}" in conffiles:
                continue
            with open(path, "rb") as f:
                lines.append(f"{hashlib.md5(f.read()).hexdigest()}  {rel}\n")
    return "".join(sorted(lines, key=lambda line: line[34:]))


def du_kb(root: str) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        total += sum(os.path.getsize(os.path.join(dirpath, f)) for f in files)
    return max(1, (total + 1023) // 1024)


def build(out: str) -> str:
    proj = project()
    version = str(proj["version"])
    os.makedirs(out, exist_ok=True)
    deb = os.path.join(os.path.abspath(out), f"xtnd_{version}_all.deb")
    with tempfile.TemporaryDirectory(prefix="xtnd-deb-") as tmp:
        root = os.path.join(tmp, "xtnd")
        conffiles = layout(root, version, proj)
        meta = os.path.join(root, "DEBIAN")
        write(os.path.join(meta, "control"), control(version, proj, du_kb(root)))
        write(os.path.join(meta, "conffiles"), "".join(f"{c}\n" for c in conffiles))
        write(os.path.join(meta, "md5sums"), md5sums(root, set(conffiles)))
        for script in ("postinst", "prerm"):
            copy(os.path.join(HERE, "debian", script), os.path.join(meta, script), 0o755)
        for dirpath, dirnames, _files in os.walk(root):
            for d in dirnames:
                os.chmod(os.path.join(dirpath, d), 0o755)
        subprocess.run(["dpkg-deb", "--root-owner-group", "-Zxz", "--build", root, deb], check=True,
                       stdout=subprocess.DEVNULL)  # fmt: skip
    return deb


def main() -> int:
    parser = argparse.ArgumentParser(description="Build xtnd_VERSION_all.deb")
    parser.add_argument("--out", default=os.path.join(REPO, "dist"), help="output directory (default dist/)")
    args = parser.parse_args()
    print(build(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
