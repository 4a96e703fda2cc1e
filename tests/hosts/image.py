# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The Debian root file systems the test hosts boot from (built once per release, cached).

``debootstrap --variant=minbase`` from Debian's mirror into ``~/.cache/lanyard/hosts/<key>/rootfs``,
one image per release: ``bookworm`` (Debian 12, the default) and ``trixie`` (Debian 13).
The key hashes everything that shapes the image (suite, packages, this file's customisation
version), so a change rebuilds it and an unchanged one is reused. The build goes into a temporary
directory first and is renamed into place only when complete: a half-built image is never used.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

# Release (debootstrap suite) -> Debian major version. Debian 12's debootstrap (1.0.128+deb12u2)
# ships a ``trixie`` script (a link to ``sid``), so both build with the controller's debootstrap.
RELEASES = {"bookworm": "12", "trixie": "13"}
DEFAULT_RELEASE = "bookworm"
SUITE = DEFAULT_RELEASE
MIRROR = os.environ.get("LANYARD_DEBIAN_MIRROR", "http://deb.debian.org/debian")
# systemd as PID 1, D-Bus for systemctl, Python for Ansible and the agent's venv, ACL tools for
# the reader checks, sudo/util-linux for "run as another user" in verify tasks.
PACKAGES = (
    "systemd", "systemd-sysv", "dbus", "python3", "python3-venv", "acl", "ca-certificates",
    "procps", "sudo", "iproute2", "less",
)
# Bump when the customisation below changes, so cached images are rebuilt.
CUSTOMISATION_VERSION = "3"


class HostError(Exception):
    """A test host could not be built, started or reached; the message names the cause and the fix."""


def cache_root() -> Path:
    return Path(os.environ.get("LANYARD_CACHE", Path.home() / ".cache" / "lanyard")) / "hosts"


def check_release(release: str) -> str:
    if release not in RELEASES:
        raise HostError(f"test host image: unknown Debian release {release!r}. "
                        f"Fix: use one of {', '.join(RELEASES)}")
    return release


def image_key(release: str = DEFAULT_RELEASE) -> str:
    h = hashlib.sha256()
    h.update("\n".join([check_release(release), MIRROR, *PACKAGES, CUSTOMISATION_VERSION]).encode())
    return f"debian{RELEASES[release]}-{h.hexdigest()[:12]}"


def image_dir(release: str = DEFAULT_RELEASE) -> Path:
    return cache_root() / image_key(release)


def rootfs(release: str = DEFAULT_RELEASE) -> Path:
    return image_dir(release) / "rootfs"


def _log(msg: str) -> None:
    print(f"[hosts] {msg}", file=sys.stderr, flush=True)


def _customise(root: Path) -> None:
    (root / "etc/hostname").write_text("testhost\n")
    (root / "etc/hosts").write_text("127.0.0.1 localhost\n::1 localhost ip6-localhost\n127.0.1.1 testhost\n")
    # Every copy generates its own machine-id at first boot.
    (root / "etc/machine-id").write_text("")
    dbus_id = root / "var/lib/dbus/machine-id"
    if dbus_id.is_symlink() or dbus_id.exists():
        dbus_id.unlink()
    # Units that make no sense in a container or would reach for the network.
    for unit in ("apt-daily.timer", "apt-daily-upgrade.timer", "systemd-networkd-wait-online.service",
                 "e2scrub_all.timer", "fstrim.timer", "systemd-timesyncd.service", "getty@tty1.service",
                 "console-getty.service"):
        link = root / "etc/systemd/system" / unit
        if not link.exists() and not link.is_symlink():
            link.symlink_to("/dev/null")
    (root / "etc/resolv.conf").write_text("")  # no DNS: the hosts reach only what the harness forwards
    # Ansible runs Python modules; keep pyc files out of the image's lifetime accounting.
    (root / "etc/environment").write_text("PYTHONDONTWRITEBYTECODE=1\n")


def build(force: bool = False, release: str = DEFAULT_RELEASE) -> Path:
    """Return the cached rootfs of ``release``, building it first when absent (prints progress and duration).

    Several test processes may ask at once: one builds under a lock, the others wait and reuse it."""
    target = image_dir(release)
    done = target / ".complete"
    if done.exists() and not force:
        return target / "rootfs"
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if done.exists() and not force:
            return target / "rootfs"
        return _build(target, release)


def _build(target: Path, release: str) -> Path:
    for tool in ("debootstrap", "systemd-nspawn"):
        if shutil.which(tool) is None:
            raise HostError(f"test host image: `{tool}` is not installed. Fix: apt-get install "
                            f"{'debootstrap' if tool == 'debootstrap' else 'systemd-container'} "
                            "(or run scripts/bootstrap.sh as root)")
    if os.geteuid() != 0:
        raise HostError("test host image: debootstrap and systemd-nspawn need root. Fix: run the tests as root")
    tmp = target.parent / f".{target.name}.build-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    t0 = time.monotonic()
    _log(f"building Debian {RELEASES[release]} ({release}) image {target.name} with debootstrap from {MIRROR} "
         "(about 1-2 min) ...")
    log = tmp / "debootstrap.log"
    with open(log, "wb") as fh:
        rc = subprocess.run(
            ["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}", release,
             str(tmp / "rootfs"), MIRROR], stdout=fh, stderr=subprocess.STDOUT, check=False).returncode
    if rc != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-5:]
        shutil.rmtree(tmp, ignore_errors=True)
        raise HostError(f"test host image: debootstrap failed ({rc}): {' | '.join(tail)}. "
                        f"Fix: check that {MIRROR} is reachable (LANYARD_DEBIAN_MIRROR overrides it)")
    _log(f"debootstrap done in {time.monotonic() - t0:.0f} s; customising")
    _customise(tmp / "rootfs")
    (tmp / ".complete").write_text(f"{time.monotonic() - t0:.1f}\n")
    if target.exists():
        shutil.rmtree(target)
    os.rename(tmp, target)
    _log(f"image {target.name} ready in {time.monotonic() - t0:.0f} s ({target})")
    return target / "rootfs"
