#!/usr/bin/env bash
# The one entry point on a fresh Debian 12 machine, as root. Each command
# installs what it needs (idempotently, fast when already done), then runs:
#
#   bash tools/run.sh demo    cluster-in-a-box demo (the main job)
#   bash tools/run.sh test    the whole test suite, ruff and mypy included
#   bash tools/run.sh setup   only install and start what is needed
#   bash tools/run.sh xtnd …  run the xtnd CLI from the project venv
#   bash tools/run.sh package build dist/xtnd_VERSION_all.deb (path printed last)
#
# XTND_VENV (default /opt/xtnd/venv) chooses where the virtualenv lives.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${XTND_VENV:-/opt/xtnd/venv}
# Debian's interpreter: sanlock's binding (python3-sanlock) exists only for it.
SYSTEM_PYTHON=/usr/bin/python3

APT_PACKAGES=(
    lvm2 sanlock python3-sanlock
    libvirt-daemon-system libvirt-clients libvirt-dev pkg-config
    qemu-system-x86 qemu-utils busybox-static cpio
    # The guest rig's kernel (xtnd.tools.rig.guest): demo, hsm bench, tests.
    linux-image-cloud-amd64
    python3-venv python3-dev gcc util-linux kmod
    # mkfs.ext4 for the stuck-lvextend test (a PV on a frozen ext4).
    e2fsprogs
    python3-prometheus-client python3-matplotlib systemd
    # The SPM sums inbox block checksums with it when 2000 hosts write at once.
    python3-numpy
    # The Debian package's dependencies (its test installs it with apt),
    # and what builds and checks it.
    python3-construct python3-libvirt python3-rich
    # The HSM's host API (HTTP server; the venv sees system site packages)
    # and its automatic mode (udev events of grown block devices).
    python3-aiohttp python3-pyudev
    # xtnd inject's FUSE layer (slow/failing mailbox storage: no device-mapper here).
    python3-fusepy
    dpkg-dev lintian
)

say() { printf '== %s\n' "$*" >&2; }

need_root() {
    if [ "$(id -u)" != 0 ]; then
        echo "tools/run.sh: must run as root (LVM, loop devices, sanlock, libvirt)" >&2
        exit 1
    fi
}

install_packages() {
    local missing=() p
    for p in "${APT_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        say "installing Debian packages: ${missing[*]}"
        apt-get -o DPkg::Lock::Timeout=900 update -qq
        DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=900 install -y -qq "${missing[@]}" >/dev/null
    fi
}

install_venv() {
    if [ ! -x "$VENV/bin/python" ]; then
        say "creating virtualenv $VENV"
        mkdir -p "$(dirname "$VENV")"
        "$SYSTEM_PYTHON" -m venv --system-site-packages "$VENV"
    fi
    # Reinstall when the dependencies or the checkout location change (CI
    # clones to a new path each time; an editable install points at one).
    local stamp
    stamp=$(cat "$REPO/pyproject.toml" <(echo "$REPO") | sha256sum | cut -d' ' -f1)
    if [ "$(cat "$VENV/.xtnd-stamp" 2>/dev/null)" != "$stamp" ]; then
        say "installing xtnd and its Python dependencies into $VENV"
        "$VENV/bin/pip" install -q --disable-pip-version-check -e "$REPO[test]"
        echo "$stamp" >"$VENV/.xtnd-stamp"
    fi
    # The venv sees the system's dist-packages: were the xtnd Debian package
    # installed (its test does that), Python's path finder would import
    # /usr/lib/python3/dist-packages/xtnd before the editable install's
    # finder (appended to sys.meta_path) is asked. Put that finder first.
    local site
    site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    echo 'import sys; sys.meta_path.sort(key=lambda f: not getattr(f, "__module__", "").startswith("__editable___xtnd_"))' \
        >"$site/zz-xtnd-editable-first.pth"
}

# mypy cannot follow the editable-install import hook that maps xtnd.<area>
# onto the root folders, so it checks a tree of symlinks with the same shape.
typecheck_tree() {
    local tree="$VENV/typecheck" area
    rm -rf "$tree"
    mkdir -p "$tree/xtnd"
    for area in common mailbox spm hsm lvm storage tools; do
        ln -s "$REPO/$area" "$tree/xtnd/$area"
    done
    echo "$tree"
}

start_libvirt() {
    # No init system here: start the daemons libvirt's qemu driver needs.
    pgrep -x virtlogd >/dev/null || virtlogd -d
    pgrep -x libvirtd >/dev/null || libvirtd -d
    local i
    for i in $(seq 100); do
        [ -S /run/libvirt/libvirt-sock ] && return 0
        sleep 0.1
    done
    echo "libvirtd did not create its socket" >&2
    return 1
}

setup() {
    need_root
    install_packages
    install_venv
    start_libvirt
}

run_tests() {
    cd "$REPO"
    say "ruff"
    "$VENV/bin/ruff" check .
    say "mypy"
    local tree
    tree=$(typecheck_tree)
    (cd "$tree" && MYPYPATH="$tree" "$VENV/bin/mypy" --config-file "$REPO/pyproject.toml" \
        -p xtnd.common -p xtnd.mailbox -p xtnd.spm -p xtnd.hsm -p xtnd.lvm -p xtnd.storage -p xtnd.tools)
    say "pytest"
    local marks="not soak"
    [ "${XTND_SOAK:-0}" = 1 ] && marks=""
    "$VENV/bin/python" -m pytest --durations=25 -m "$marks" "$@"
}

cmd=${1:-help}
shift || true
case "$cmd" in
    setup) setup ;;
    test) setup; run_tests "$@" ;;
    demo) setup; exec "$VENV/bin/xtnd" demo "$@" ;;
    xtnd) setup; exec "$VENV/bin/xtnd" "$@" ;;
    package) setup; exec "$VENV/bin/python" "$REPO/packaging/build_deb.py" "$@" ;;
    *) sed -n '2,13p' "$0"; exit 2 ;;
esac
