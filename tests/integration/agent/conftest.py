# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Fixtures for machine-id-agent on the real bed: real local users, a world-traversable work directory,
and an ``AgentHost`` that lays out one host the way the guide does (config, storage, destination).

The agent runs as the unprivileged user ``lanyardtest-bot``, from ``agent_venv``: a virtualenv in a 0755
directory, made with the system's /usr/bin/python3 like the role's /opt/machine-id-agent, holding the agent's
dependencies (copied from the test venv, same versions) and this checkout's agent, with the console script
``bin/machine-id-agent``. So the kubeconfig's exec plugin (the default) is a program the reader can run, as on
a real host. The bot process still gets the one ambient capability CAP_DAC_READ_SEARCH (it used to need it for
the venv under /root, mode 0700). It cannot write, chown or set ACLs on anything it does not own. The reader
(``lanyardtest-app``) and the other user (``lanyardtest-other``) get no capabilities; they read with ``cat``
and with a copy of kubectl in a 0755 directory.
"""

from __future__ import annotations

import fcntl
import importlib.metadata as _md
import json
import os
import re
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Dict, List, Optional

import pytest
import yaml

import testbed as tb

BOT_USER, APP_USER, OTHER_USER = "lanyardtest-bot", "lanyardtest-app", "lanyardtest-other"
AGENT_ROLE = "lanyard-agent-kube"
KUBE_GROUP = "lanyard-agent"


def _ensure_user(name: str) -> int:
    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        pass
    # Several test workers may get here at once: one useradd at a time (a second one would find /etc/passwd
    # locked and fail), and a user made meanwhile by another worker is taken as it is.
    with open("/run/lanyard-test-useradd.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            return pwd.getpwnam(name).pw_uid
        except KeyError:
            pass
        r = subprocess.run(["useradd", "--system", "--user-group", "--no-create-home", "--shell",
                            "/usr/sbin/nologin", name], capture_output=True, text=True, check=False)
    if r.returncode != 0 and "already exists" not in r.stderr:
        pytest.fail("cannot create test user %s (%s); run the tests as root" % (name, r.stderr.strip()),
                    pytrace=False)
    return pwd.getpwnam(name).pw_uid


@pytest.fixture(scope="session")
def agent_users() -> Dict[str, int]:
    if os.geteuid() != 0:
        pytest.fail("the agent e2e tests need root (they create users and switch to them)", pytrace=False)
    for tool in ("setpriv", "runuser", "useradd", "getfacl"):
        if shutil.which(tool) is None:
            pytest.fail("%s is missing; run scripts/bootstrap.sh (util-linux, passwd, acl)" % tool, pytrace=False)
    return {n: _ensure_user(n) for n in (BOT_USER, APP_USER, OTHER_USER)}


@pytest.fixture(scope="session")
def public_root():
    """A 0755 directory under /tmp (pytest's tmp_path is 0700, which would hide everything from readers)."""
    d = Path(tempfile.mkdtemp(prefix="lanyard-agent-e2e-"))
    os.chmod(d, 0o755)
    yield d
    if not os.environ.get("LANYARD_KEEP_TESTBED"):
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def user_kubectl(testbed_bins, public_root) -> Path:
    """kubectl where unprivileged users can run it."""
    d = public_root / "bin"
    d.mkdir(mode=0o755, exist_ok=True)
    dst = d / "kubectl"
    shutil.copy2(testbed_bins["kubectl"], dst)
    os.chmod(dst, 0o755)
    return dst


def _requirements(dist_name: str, seen: set) -> None:
    """``dist_name`` and every distribution it needs (for this interpreter and platform), recursively."""
    key = re.sub(r"[-_.]+", "-", dist_name).lower()
    if key in seen:
        return
    seen.add(key)
    dist = _md.distribution(dist_name)
    for req in dist.requires or []:
        name, _sep, marker = req.partition(";")
        if marker:
            try:
                from packaging.markers import Marker
                if not Marker(marker).evaluate({"extra": ""}):
                    continue
            except Exception:
                continue
        name = re.split(r"[\s\[<>=!~(]", name.strip(), maxsplit=1)[0]
        _requirements(name, seen)


@pytest.fixture(scope="session")
def agent_venv(public_root, agent_users) -> Path:
    """The agent installed where every user can run it, like the role's /opt/machine-id-agent: a venv of the
    system Python (0755), the agent's dependencies copied from the test venv (same versions, same cp311 ABI),
    this checkout's agent (agent/src) and the console script ``bin/machine-id-agent``."""
    system_py = "/usr/bin/python3"
    if not os.access(system_py, os.X_OK):
        pytest.fail("%s is missing; the agent e2e tests install the agent for the system Python" % system_py,
                    pytrace=False)
    venv = public_root / "agent-venv"
    r = subprocess.run([system_py, "-m", "venv", "--without-pip", str(venv)], capture_output=True, text=True,
                       check=False)
    if r.returncode != 0:
        pytest.fail("cannot make the agent's venv with %s: %s" % (system_py, r.stderr.strip()), pytrace=False)
    site = Path(subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()"
                                "['purelib'])"], capture_output=True, text=True, check=True).stdout.strip())
    here = "%d.%d" % sys.version_info[:2]
    there = subprocess.run([str(venv / "bin" / "python"), "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                           capture_output=True, text=True, check=True).stdout.strip()
    if here != there:
        pytest.fail("the system Python is %s and the test venv's %s: the copied dependencies need the same version"
                    % (there, here), pytrace=False)
    deps: set = set()
    _requirements("machine-id-agent", deps)
    deps.discard("machine-id-agent")
    for name in sorted(deps):
        dist = _md.distribution(name)
        base = Path(str(dist.locate_file("")))
        for f in dist.files or []:
            src = Path(str(dist.locate_file(f)))
            try:
                rel = src.resolve().relative_to(base.resolve())
            except ValueError:
                continue  # console scripts in bin/ and the like
            dst = site / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            if src.is_file():
                shutil.copy2(src, dst)
    agent_src = Path(__file__).resolve().parents[3] / "agent" / "src"
    (site / "lanyard_agent_checkout.pth").write_text(str(agent_src) + "\n")
    script = venv / "bin" / "machine-id-agent"
    script.write_text("#!%s\nimport sys\n\nfrom machine_id_agent.cli import main\n\nsys.exit(main())\n"
                      % (venv / "bin" / "python"))
    for root, dirs, files in os.walk(venv):
        os.chmod(root, 0o755)
        for f in files:
            p = os.path.join(root, f)
            if not os.path.islink(p):
                os.chmod(p, 0o755 if f == "machine-id-agent" or os.access(p, os.X_OK) else 0o644)
    runuser = shutil.which("runuser") or "/usr/sbin/runuser"
    r = subprocess.run([runuser, "-u", APP_USER, "--", str(script), "version"], capture_output=True, text=True,
                       check=False, env={"PATH": "/usr/bin:/bin"}, cwd="/")
    if r.returncode != 0:
        pytest.fail("the agent's venv does not run for %s: %s" % (APP_USER, r.stderr.strip()[-500:]), pytrace=False)
    return venv


def setup_rbac(tp, kube) -> None:
    """A Teleport role that maps to Kubernetes group ``lanyard-agent``, and read access to pods in ``demo``
    for that group (idempotent)."""
    role = {"kind": "role", "version": "v6", "metadata": {"name": AGENT_ROLE},
            "spec": {"allow": {"kubernetes_labels": {"*": "*"}, "kubernetes_groups": [KUBE_GROUP],
                               "kubernetes_resources": [{"kind": "pod", "namespace": "*", "name": "*"}]}}}
    f = Path(tempfile.mkstemp(prefix="lanyard-agent-role-", suffix=".yaml")[1])
    try:
        f.write_text(yaml.safe_dump(role))
        tp.tctl("create", "-f", str(f), "--force", check=True)
        rbac = [
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
             "metadata": {"name": "lanyard-agent-pods", "namespace": tb.DEMO_NAMESPACE},
             "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]}]},
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
             "metadata": {"name": "lanyard-agent-pods", "namespace": tb.DEMO_NAMESPACE},
             "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "lanyard-agent-pods"},
             "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": KUBE_GROUP}]},
        ]
        f.write_text(yaml.safe_dump_all(rbac))
        kube.kubectl("apply", "-f", str(f), check=True)
    finally:
        f.unlink()


class AgentHost:
    """One host: /etc/tbot.yaml-like config, a storage dir owned by the bot user, a destination set up by
    ``machine-id-agent init``. Commands run as the bot user."""

    def __init__(self, tp, kube, root: Path, users: Dict[str, int], kubectl: Path, bot: Optional[str] = None,
                 agent_bin: Optional[Path] = None, **cfg_extra):
        self.tp, self.kube, self.users, self.kubectl_bin = tp, kube, users, kubectl
        # the console script of agent_venv; None: the test venv's interpreter (`python -m machine_id_agent`)
        self.agent_bin = agent_bin
        self.root = root
        root.mkdir(mode=0o755, parents=True, exist_ok=True)
        self.bot = bot or "agent-%s-%s" % (tp.mode[:3], uuid.uuid4().hex[:8])
        self.token = tp.bot_add(self.bot, [AGENT_ROLE])
        self.pin = tp.status_ca_pin()
        self.storage = root / "bot"
        self.dest = root / "machine-id"
        self.config_path = root / "tbot.yaml"
        self.storage.mkdir(mode=0o700, exist_ok=True)
        os.chown(self.storage, users[BOT_USER], users[BOT_USER])
        self.write_config(**cfg_extra)
        self.procs: List[subprocess.Popen] = []

    def write_config(self, **extra) -> None:
        """The guide's /etc/tbot.yaml (v1) with the bed's proxy address, token and pin, plus ``extra``."""
        doc = {
            "auth_server": self.tp.proxy_addr,
            "onboarding": {"join_method": "token", "token": self.token, "ca_pins": [self.pin]},
            "storage": {"directory": str(self.storage)},
            "destinations": [{"directory": str(self.dest), "kubernetes_cluster": tb.KUBE_CLUSTER_NAME}],
        }
        doc.update(extra)
        self.write_config_doc(doc)

    def write_config_v2(self, outputs: list, **extra) -> None:
        """A v2 config (tbot's ``outputs:`` shape) with the bed's proxy address, token and pin."""
        doc = {
            "version": "v2",
            "auth_server": self.tp.proxy_addr,
            "onboarding": {"join_method": "token", "token": self.token, "ca_pins": [self.pin]},
            "storage": {"type": "directory", "path": str(self.storage)},
            "outputs": outputs,
        }
        doc.update(extra)
        self.write_config_doc(doc)

    def write_config_doc(self, doc: dict) -> None:
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(doc, sort_keys=False))
        os.chown(tmp, 0, self.users[BOT_USER])
        os.chmod(tmp, 0o640)
        os.replace(tmp, self.config_path)

    # -- running the agent -------------------------------------------------------------------------
    def env(self) -> Dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "JOURNAL_STREAM")}
        env["SSL_CERT_FILE"] = str(self.tp.web_ca_path)  # tbot gets the same (the proxy's test CA)
        env["HOME"] = str(self.root)
        return env

    def argv(self, *args: str, as_bot: bool = True) -> List[str]:
        py = ([str(self.agent_bin)] if self.agent_bin else [sys.executable, "-m", "machine_id_agent"]) + list(args)
        if not as_bot:
            return py
        return ["setpriv", "--reuid=%s" % BOT_USER, "--regid=%s" % BOT_USER, "--init-groups",
                "--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search"] + py

    def run(self, *args: str, as_bot: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(self.argv(*args, as_bot=as_bot), capture_output=True, text=True, env=self.env(),
                              timeout=timeout, cwd=str(self.root), check=False)

    def init(self, *readers: str) -> subprocess.CompletedProcess:
        rd = []
        for r in readers or (APP_USER,):
            rd += ["--reader-user", r]
        return self.run("init", "-c", str(self.config_path), "--init-dir", str(self.dest), "--bot-user", BOT_USER,
                        "--owner", "%s:%s" % (BOT_USER, BOT_USER), *rd, "--json", as_bot=False)

    def oneshot(self, timeout: float = 120) -> subprocess.CompletedProcess:
        return self.run("start", "-c", str(self.config_path), "--oneshot", timeout=timeout)

    def start(self, log_name: str = "agent.log") -> subprocess.Popen:
        log = open(self.root / log_name, "ab")
        p = subprocess.Popen(self.argv("start", "-c", str(self.config_path)), stdout=log, stderr=subprocess.STDOUT,
                             env=self.env(), cwd=str(self.root))
        log.close()
        self.procs.append(p)
        return p

    def log(self, log_name: str = "agent.log") -> str:
        p = self.root / log_name
        return p.read_text(errors="replace") if p.exists() else ""

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        self.procs.clear()

    def status(self) -> dict:
        r = self.run("status", "-c", str(self.config_path), "--json", as_bot=False)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    # -- reading as users ----------------------------------------------------------------------------
    def as_user(self, user: str, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess:
        runuser = shutil.which("runuser") or "/usr/sbin/runuser"
        return subprocess.run([runuser, "-u", user, "--", *argv], capture_output=True, text=True,
                              timeout=timeout, cwd="/", env={"PATH": "/usr/bin:/bin", "HOME": "/"}, check=False)

    def kubectl_as(self, user: str, *args: str) -> subprocess.CompletedProcess:
        return self.as_user(user, str(self.kubectl_bin), "--kubeconfig=%s" % (self.dest / "kubeconfig.yaml"),
                            "--request-timeout=20s", *args)

    def pods_as(self, user: str = APP_USER) -> subprocess.CompletedProcess:
        return self.kubectl_as(user, "get", "pods", "-n", tb.DEMO_NAMESPACE, "-o", "name")


@pytest.fixture(scope="module")
def own_bed(testbed_bins):
    """A private bed for tests that take Teleport down or rotate its CAs (the shared one stays untouched); one per
    module, stopped when the module ends, so that it loads the machine only while its tests run."""
    try:
        bed = tb.Testbed.start()
    except (tb.TestbedError, tb.BuildError) as exc:
        pytest.fail("a private test bed failed to start: %s" % exc, pytrace=False)
    yield bed
    bed.stop()


@pytest.fixture
def make_host(agent_users, public_root, user_kubectl, agent_venv, request):
    hosts: List[AgentHost] = []
    rbac_done = set()

    def make(tp, kube_cluster=None, **cfg_extra) -> AgentHost:
        k = kube_cluster or request.getfixturevalue("kube")
        if id(tp) not in rbac_done:
            setup_rbac(tp, k)
            rbac_done.add(id(tp))
        root = public_root / ("h-" + uuid.uuid4().hex[:10])
        cfg_extra.setdefault("agent_bin", agent_venv / "bin" / "machine-id-agent")
        h = AgentHost(tp, k, root, agent_users, user_kubectl, **cfg_extra)
        hosts.append(h)
        return h

    yield make
    for h in hosts:
        h.stop()
