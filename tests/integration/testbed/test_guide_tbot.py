# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The guide, run by hand on the real test bed with the real ``tbot``: the reference run.

Each listener mode gets its own private bed (so nothing another test module creates -- a bot named
``example``, a RoleBinding for group ``example`` -- can change the outcome). Steps follow
``guide-machine-id-kubernetes.txt``; where the built version or the bed forces a deviation, the test
says so next to it (see docs/testbed.md).
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
import yaml

import testbed as tb
from helpers.guide import GUIDE_ROLE

pytestmark = [pytest.mark.testbed]


def guide_tbot_yaml(auth_server: str, token: str, pin: str, storage: Path, destination: Path) -> str:
    """Step 2's /etc/tbot.yaml (config v1, ``destinations:``), with the bed's addresses and paths."""
    return yaml.safe_dump({
        "auth_server": auth_server,
        "onboarding": {"join_method": "token", "token": token, "ca_pins": [pin]},
        "storage": {"directory": str(storage)},
        "destinations": [{"directory": str(destination), "kubernetes_cluster": tb.KUBE_CLUSTER_NAME}],
    }, sort_keys=False)


@pytest.fixture(scope="module", params=tb.MODES)
def bed(request, testbed_bins):
    """A private bed with one Teleport cluster in the requested listener mode."""
    try:
        b = tb.Testbed.start(modes=(request.param,))
    except (tb.TestbedError, tb.BuildError) as exc:
        pytest.fail(f"the real test bed failed to start: {exc}", pytrace=False)
    yield b
    b.stop()


def test_guide_end_to_end_with_real_tbot(bed, tmp_path):
    mode = next(iter(bed.teleport))
    tp, kube = bed.teleport[mode], bed.kube

    # Step 1: the guide's Teleport role and bot.
    role_file = tmp_path / "role.yaml"
    role_file.write_text(GUIDE_ROLE)
    tp.tctl("create", "-f", str(role_file), check=True)
    token = tp.bot_add("example", ["machine-id-kube-role"])
    pin = tp.status_ca_pin()
    assert pin.startswith("sha256:") and len(pin) == len("sha256:") + 64
    assert pin in tp.ca_pins(), "tctl status pin must be the SPKI hash of the host CA"

    # Step 1 (Kubernetes side): the guide's kubectl commands. The guide creates the Role in
    # `example-namespace` but binds it in `demo`; a RoleBinding can only refer to a Role of its own
    # namespace, so the Role goes to `demo` here.
    kube.kubectl("create", "role", "example-role", "--namespace=demo", "--verb=get,list",
                 "--resource=pods,deployments", check=True)
    kube.kubectl("create", "rolebinding", "example-rolebinding-group", "--namespace=demo",
                 "--role=example-role", "--group=example", check=True)

    # Step 2: /etc/tbot.yaml as the guide writes it, then tbot (oneshot, as the reference run).
    storage, dest = tmp_path / "bot", tmp_path / "machine-id"
    storage.mkdir(mode=0o700)
    dest.mkdir(mode=0o700)
    cfg = tmp_path / "tbot.yaml"
    cfg.write_text(guide_tbot_yaml(tp.proxy_addr, token, pin, storage, dest))
    t0 = time.monotonic()
    run = subprocess.run([str(bed.bins["tbot"]), "start", "-c", str(cfg), "--oneshot"],
                         capture_output=True, text=True, env=tp.env, timeout=120, check=False)
    assert run.returncode == 0, f"tbot failed:\n{run.stdout}\n{run.stderr[-3000:]}"
    startup = time.monotonic() - t0
    kubeconfig = dest / "kubeconfig.yaml"
    assert kubeconfig.is_file(), sorted(p.name for p in dest.iterdir())
    doc = yaml.safe_load(kubeconfig.read_text())
    cluster = doc["clusters"][0]["cluster"]
    if mode == "multiplex":
        assert cluster.get("tls-server-name", "").startswith("kube-teleport-proxy-alpn."), cluster
    else:
        assert cluster["server"] == f"https://{tp.kube_public_addr}", cluster

    # Step 3: kubectl through the bot's kubeconfig lists the pod.
    get = kube.kubectl("get", "pods", "-n", tb.DEMO_NAMESPACE, kubeconfig=kubeconfig)
    assert get.returncode == 0, get.stderr
    assert tb.DEMO_POD in get.stdout

    # Without the RoleBinding the same read is Forbidden.
    kube.kubectl("delete", "rolebinding", "example-rolebinding-group", "--namespace=demo", check=True)
    denied = kube.kubectl("get", "pods", "-n", tb.DEMO_NAMESPACE, kubeconfig=kubeconfig)
    assert denied.returncode != 0
    assert "forbidden" in denied.stderr.lower(), denied.stderr

    # /webapi/ping reports the listener mode the guide asks users to check.
    ping = tp.ping()
    assert ping["proxy"]["tls_routing_enabled"] is (mode == "multiplex")
    if mode == "separate":
        assert ping["proxy"]["kube"]["public_addr"] == tp.kube_public_addr
    print(f"[reference] mode={mode} tbot oneshot start->kubeconfig {startup:.2f}s")
