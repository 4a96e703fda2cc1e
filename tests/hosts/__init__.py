# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The project's own real systemd test hosts (Debian 12, or 13 with ``release="trixie"``, under systemd-nspawn).

Python API::

    from hosts import Host
    h = Host.start("mol-1", forward_ports=[3080])   # fresh copy of the cached image, systemd booted
    Host.start("mol-2", release="trixie")          # the same on Debian 13
    h.run(["systemctl", "is-system-running"])
    h.stop()                                          # powers off, deletes the copy

CLI: ``python -m hosts build [--release R]|start NAME [--forward PORT]... [--release R]|stop NAME|stop-all|run NAME -- CMD...``.
Ansible: connection plugin ``lanyard_nspawn`` in ``tests/hosts/connection_plugins`` (inventory host = NAME).
"""

from __future__ import annotations

from .host import Host, runs_dir, stop_all
from .image import HostError, build, image_dir, rootfs

CONNECTION_PLUGINS = __import__("pathlib").Path(__file__).resolve().parent / "connection_plugins"

__all__ = ["Host", "HostError", "build", "image_dir", "rootfs", "runs_dir", "stop_all", "CONNECTION_PLUGINS"]
