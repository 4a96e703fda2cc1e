# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The real test bed: etcd + kube-apiserver and Teleport (auth, proxy, kubernetes_service) on loopback.

Python API (for tests and benchmarks)::

    from testbed import Testbed
    with Testbed.start(modes=("multiplex",)) as bed:
        tp = bed.teleport["multiplex"]
        tp.tctl("status", check=True)
        bed.kube.kubectl("get", "pods", "-n", "demo")

Nothing outlives the Python process that started it (see procs.py).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .build import BuildError, find_binaries, missing_message
from .kube import DEMO_NAMESPACE, DEMO_POD, KUBE_CLUSTER_NAME, KubeCluster
from .procs import TestbedError
from .teleport import CLUSTER_NAME, MODES, TeleportCluster

__all__ = ["Testbed", "TestbedError", "BuildError", "MODES", "KUBE_CLUSTER_NAME", "CLUSTER_NAME",
           "DEMO_NAMESPACE", "DEMO_POD", "require_binaries"]


def require_binaries() -> dict[str, Path]:
    found = find_binaries()
    missing = [k for k, v in found.items() if v is None]
    if missing:
        raise BuildError(missing_message(missing))
    return {k: v for k, v in found.items() if v is not None}


@dataclass
class Testbed:
    workdir: Path
    bins: dict[str, Path]
    kube: KubeCluster
    teleport: dict[str, TeleportCluster] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    _own_workdir: bool = False

    @classmethod
    def start(cls, modes: tuple[str, ...] = MODES, workdir: Path | None = None) -> "Testbed":
        bins = require_binaries()
        own = workdir is None
        workdir = Path(workdir or tempfile.mkdtemp(prefix="lanyard-testbed-"))
        workdir.mkdir(parents=True, exist_ok=True)
        os.chmod(workdir, 0o755)
        t0 = time.monotonic()
        kube = KubeCluster(bins, workdir / "kube")
        bed = cls(workdir=workdir, bins=bins, kube=kube, _own_workdir=own)
        try:
            kube.start()
            bed.timings["kube"] = time.monotonic() - t0
            for mode in modes:
                t = time.monotonic()
                bed.teleport[mode] = TeleportCluster(bins, workdir / f"teleport-{mode}", kube, mode).start()
                bed.timings[f"teleport-{mode}"] = time.monotonic() - t
        except BaseException:
            bed.stop()
            raise
        bed.timings["total"] = time.monotonic() - t0
        return bed

    def stop(self, keep_workdir: bool = False) -> None:
        for tp in self.teleport.values():
            tp.stop()
        self.kube.stop()
        if self._own_workdir and not keep_workdir and not os.environ.get("LANYARD_KEEP_TESTBED"):
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "Testbed":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def exports(self, mode: str) -> dict[str, str]:
        tp = self.teleport[mode]
        return {
            "TELEPORT_PROXY": tp.proxy_addr,
            "TELEPORT_AUTH_SERVER": tp.auth_addr,
            "TELEPORT_CONFIG_FILE": str(tp.config_path),
            "TELEPORT_IDENTITY_FILE": str(tp.admin_identity),
            "SSL_CERT_FILE": str(tp.web_ca_path),
            "KUBECONFIG": str(self.kube.admin_kubeconfig),
            "PATH": f"{self.bins['tctl'].parent}:{os.environ.get('PATH', '')}",
        }
