# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""A host set up by hand from guide-machine-id-kubernetes.txt with the bed's real ``tbot`` (v13.3.8), for the
takeover tests: Step 1 (the Teleport role, Kubernetes RBAC for group ``example``) and Step 2 on one host (the bot
from ``tctl bots add``, ``/etc/tbot.yaml`` v1 with the onboarding token and CA pin, ``tbot init`` with the guide's
flags, the storage directory, the guide's unit under a chosen name, started). The one deviation from the guide:
the bed's web CA goes into the host's CA bundle (a real proxy has a public certificate). Used by
tests/integration/rollout/test_adopt_tbot.py and test_adopt_tbot_edges.py, parametrised by bot and unit name."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import yaml

from helpers.fleet import wait_for
from helpers.guide import GUIDE_ROLE

STORAGE = "/var/lib/teleport/bot"
DEST = "/opt/machine-id"

# The guide's unit, verbatim (Step 2).
GUIDE_UNIT = """[Unit]
Description=Teleport Machine ID Service
After=network.target

[Service]
Type=simple
User=teleport
Group=teleport
Restart=on-failure
Environment="TELEPORT_ANONYMOUS_TELEMETRY=1"
ExecStart=/usr/local/bin/tbot start -c /etc/tbot.yaml
ExecReload=/bin/kill -HUP $MAINPID
PIDFile=/run/machine-id.pid
LimitNOFILE=524288

[Install]
WantedBy=multi-user.target
"""


def sh(host, script: str, check: bool = True, timeout: float = 120):
    r = host.run(["sh", "-c", script], check=False, timeout=timeout)
    if check:
        assert r.returncode == 0, f"{script}\n{r.stdout}\n{r.stderr}"
    return r


def control_plane_by_hand(tp, kube, tmp_path: Path) -> None:
    """Step 1 of the guide. The Kubernetes objects get names of their own: the rollout manages ``example-role``
    with server-side apply and would refuse to take over fields ``kubectl create`` owns."""
    role = tmp_path / "guide-role.yaml"
    role.write_text(GUIDE_ROLE)
    tp.tctl("create", "-f", str(role), check=True)
    kube.kubectl("create", "role", "guide-role", "--namespace=demo", "--verb=get,list",
                 "--resource=pods,deployments", check=True)
    kube.kubectl("create", "rolebinding", "guide-rolebinding-group", "--namespace=demo", "--role=guide-role",
                 "--group=example", check=True)


def build_by_hand(fleet, bed, name: str, bot: str, unit: str, extra_config: dict | None = None) -> None:
    """Step 2 of the guide on host ``name``: bot ``bot``, the guide's unit as ``<unit>.service``, started, and the
    reader (``app``) reaching the cluster through tbot's kubeconfig."""
    tp, host = fleet.teleport, fleet.hosts[name]
    token = tp.bot_add(bot, ["machine-id-kube-role"])
    pin = tp.status_ca_pin()
    shutil.copy2(bed.bins["tbot"], host.root / "usr/local/bin/tbot")
    bundle = host.root / "etc/ssl/certs/ca-certificates.crt"
    bundle.parent.mkdir(parents=True, exist_ok=True)
    with open(bundle, "a") as f:
        f.write(Path(tp.web_ca_path).read_text())
    cfg = {"auth_server": tp.proxy_addr,
           "onboarding": {"join_method": "token", "token": token, "ca_pins": [pin]},
           "storage": {"directory": STORAGE},
           "destinations": [{"directory": DEST, "kubernetes_cluster": "example-k8s-cluster"}]}
    cfg.update(extra_config or {})
    (host.root / "etc/tbot.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    sh(host, "useradd --system --create-home teleport && useradd --create-home app")
    sh(host, f"tbot init -c /etc/tbot.yaml --init-dir={DEST} --bot-user=teleport --owner=teleport:teleport "
             "--reader-user=app")
    sh(host, f"mkdir -p {STORAGE} && chown teleport:teleport {STORAGE} && chmod +x /var/lib/teleport {STORAGE}")
    (host.root / f"etc/systemd/system/{unit}.service").write_text(GUIDE_UNIT)
    sh(host, f"systemctl daemon-reload && systemctl enable {unit} && systemctl start {unit}")
    ok = wait_for(lambda: fleet.reader_get_pods(name).returncode == 0, timeout=120)
    assert ok, (fleet.reader_get_pods(name).stderr,
                sh(host, f"journalctl -u {unit} --no-pager | tail -30", check=False).stdout)


def tree_digest(host, path: str) -> dict[str, str]:
    """Name (relative to ``path``, recursively) -> SHA-256 of every regular file under ``path`` on the host."""
    root = host.root / path.lstrip("/")
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}


def tree_digest_inside(host, path: str) -> dict[str, str]:
    """Like :func:`tree_digest`, read inside the host (through its mounts, e.g. a tmpfs mounted over ``path``,
    which the controller's view of the root file system does not see)."""
    out = sh(host, f"cd {path} && find . -type f -exec sha256sum {{}} +").stdout
    return {name[2:]: digest for digest, name in (line.split(None, 1) for line in out.splitlines())}


def unit_state(host, unit: str) -> tuple[str, str, str]:
    """(ActiveState, UnitFileState, MainPID) of ``unit``."""
    out = sh(host, f"systemctl show {unit} -p ActiveState -p UnitFileState -p MainPID", check=False).stdout
    props = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    return props.get("ActiveState", ""), props.get("UnitFileState", ""), props.get("MainPID", "")


def tbot_processes(host) -> list[str]:
    out = sh(host, "ps -eo pid,user,args", check=False).stdout
    return [line for line in out.splitlines() if "/usr/local/bin/tbot " in line]
