"""The INI loader shared by the SPM and HSM configs, and the README's samples."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from xtnd.common import ini
from xtnd.hsm import config as hsm_config
from xtnd.spm import config as spm_config

MASTER = "8adbc85e-e554-4ae0-b318-8a5465fe5fe1"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
XTND = os.path.join(os.path.dirname(sys.executable), "xtnd")


def write(path: str, text: str) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    return path


def readme_samples(first_line: str) -> list[str]:
    """Indented INI blocks of README.md that start with first_line."""
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    blocks = re.findall(r"(?:^    .*\n|^\n)+", text, re.M)
    found = []
    for block in blocks:
        lines = [line[4:] for line in block.splitlines()]
        lines = [line for line in lines if line.strip()]
        if lines and lines[0].strip() == first_line:
            found.append("\n".join(lines) + "\n")
    return found


def test_readme_spm_sample_loads(workdir: str) -> None:
    samples = readme_samples("[spm]")
    assert samples, "README.md has no [spm] sample"
    for n, sample in enumerate(samples):
        config = spm_config.load(write(os.path.join(workdir, f"spm{n}.conf"), sample))
        assert config.spm.host_id >= 1
        assert config.spm.master_domain == MASTER


def test_readme_hsm_sample_loads(workdir: str) -> None:
    samples = readme_samples("[host]")
    assert samples, "README.md has no [host] sample"
    for n, sample in enumerate(samples):
        config = hsm_config.load(write(os.path.join(workdir, f"hsm{n}.conf"), sample))
        config.validate()
        assert config.host.master_domain == MASTER


def test_shipped_configs_refuse_to_run_until_filled() -> None:
    """/etc/xtnd/*.conf parse; their placeholders say what is missing."""
    with pytest.raises(ini.ConfigError, match=r"\[spm\] host_id: is required"):
        spm_config.load(os.path.join(ROOT, "etc/xtnd/spm.conf"))
    config = hsm_config.load(os.path.join(ROOT, "etc/xtnd/hsm.conf"))
    with pytest.raises(ini.ConfigError, match=r"\[host\] host_id: is required"):
        config.validate()


def test_inline_comments(workdir: str) -> None:
    path = write(
        os.path.join(workdir, "spm.conf"),
        f"[spm]\nhost_id = 3   # comment\nmaster_domain = {MASTER} ; other\ndomains = *   # all\n",
    )
    config = spm_config.load(path)
    assert config.spm.host_id == 3
    assert config.spm.domains == "*"


SPM_BASE = f"[spm]\nhost_id = 1\nmaster_domain = {MASTER}\n"
HSM_BASE = f"[host]\nhost_id = 2\nmaster_domain = {MASTER}\n"


def load_spm(path: str) -> None:
    spm_config.load(path)


def load_hsm(path: str) -> None:
    hsm_config.load(path).validate()


DAEMONS = {"spm": (SPM_BASE, load_spm), "hsm": (HSM_BASE, load_hsm)}


@pytest.mark.parametrize(
    "daemon, extra, section, key, value, reason",
    [
        ("spm", "[spm]\nmaster_domain = abc\n", "spm", "master_domain", "abc", "not a UUID"),
        ("spm", "[spm]\nhost_id = 2001\n", "spm", "host_id", "2001", "must be in 1..2000"),
        ("spm", "[spm]\nhost_id = one\n", "spm", "host_id", "one", "not an integer"),
        ("spm", "[spm]\ndomains = * xyz\n", "spm", "domains", "* xyz", "'xyz' is not a UUID"),
        ("spm", "[spm]\nstats_interval = -1\n", "spm", "stats_interval", "-1", "must be >= 0"),
        ("spm", "[lease]\nacquire_interval = 0\n", "lease", "acquire_interval", "0", "must be > 0"),
        ("spm", "[lease]\nio_timeout = 0\n", "lease", "io_timeout", "0", "must be in 1..300"),
        ("spm", "[mailbox]\nevent_interval = -0.5\n", "mailbox", "event_interval", "-0.5", "must be > 0"),
        ("spm", "[mailbox]\nworkers = 0\n", "mailbox", "workers", "0", "must be in 1..256"),
        ("spm", "[lvm]\nalloc = contigous\n", "lvm", "alloc", "contigous", "must be one of"),
        ("spm", "[lvm]\ncommand_timeout = 40\n", "lvm", "command_timeout", "40", "below \\[spm\\] shutdown_grace"),
        ("spm", "[metrics]\nlisten = nowhere\n", "metrics", "listen", "nowhere", "nowhere"),
        ("spm", "[lvm]\nbogus = 1\n", "lvm", "bogus", "1", "unknown option"),
        ("hsm", "[host]\nmaster_domain = abc\n", "host", "master_domain", "abc", "not a UUID"),
        ("hsm", "[host]\nworkers = 0\n", "host", "workers", "0", "must be in 1..256"),
        ("hsm", "[thin]\nutilization_percent = 101\n", "thin", "utilization_percent", "101", "must be in 0..100"),
        ("hsm", "[thin]\nchunk_mb = 0\n", "thin", "chunk_mb", "0", "must be >= 1"),
        ("hsm", "[monitor]\nstats_interval = -2\n", "monitor", "stats_interval", "-2", "must be > 0"),
        ("hsm", "[retry]\nbackoff_initial = 90\n", "retry", "backoff_initial", "90", "must not exceed backoff_max"),
        ("hsm", "[libvirt]\nkeepalive_count = 0\n", "libvirt", "keepalive_count", "0", "must be >= 1"),
        ("hsm", "[mailbox]\npoll_max = x\n", "mailbox", "poll_max", "x", "not a number"),
    ],
)
def test_errors_name_file_section_key_value(
    workdir: str, daemon: str, extra: str, section: str, key: str, value: str, reason: str
) -> None:
    base, load = DAEMONS[daemon]
    path = write(os.path.join(workdir, f"{daemon}.conf"), base)
    drop_in = write(path + ".d/50-local.conf", extra)
    with pytest.raises(ini.ConfigError, match=reason) as e:
        load(path)
    assert (e.value.section, e.value.key, e.value.value) == (section, key, value)
    assert e.value.file in (path, drop_in)
    assert f"[{section}] {key} = {value!r}" in str(e.value)


def test_unreadable_and_broken_files(workdir: str) -> None:
    path = write(os.path.join(workdir, "spm.conf"), "host_id = 1\n")
    with pytest.raises(ini.ConfigError, match="not an INI file") as e:
        spm_config.load(path)
    assert e.value.file == path
    os.mkdir(path + ".d")
    os.mkdir(path + ".d/dir.conf")  # a drop-in that cannot be read
    write(path, SPM_BASE)
    with pytest.raises(ini.ConfigError, match="cannot read") as e:
        spm_config.load(path)
    assert e.value.file == path + ".d/dir.conf"


@pytest.mark.parametrize("daemon, base", [("spm", SPM_BASE), ("hsm", HSM_BASE)])
def test_check_config_cli(workdir: str, daemon: str, base: str) -> None:
    """xtnd spm|hsm --check-config: 0 when usable, 2 with one line naming the fault."""
    path = write(os.path.join(workdir, f"{daemon}.conf"), base)
    ok = subprocess.run([XTND, daemon, "--config", path, "--check-config"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "OK" in ok.stdout
    write(path, base.replace("host_id = ", "host_id = -") + "# host_id was -3: a typo\n")
    bad = subprocess.run([XTND, daemon, "--config", path, "--check-config"], capture_output=True, text=True)
    assert bad.returncode == ini.EXIT_CONFIG
    assert bad.stderr.count("\n") == 1
    assert f"{path}: " in bad.stderr and "host_id = '-" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_show_round_trips_hsm(workdir: str) -> None:
    path = write(os.path.join(workdir, "hsm.conf"), HSM_BASE + "[thin]\nchunk_mb = 128\n")
    text = hsm_config.show(hsm_config.load(path))
    again = hsm_config.load(write(os.path.join(workdir, "copy.conf"), text))
    again.validate()
    assert again.thin.chunk_mb == 128
    assert again.host.host_id == 2
