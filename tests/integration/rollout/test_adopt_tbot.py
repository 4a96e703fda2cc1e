# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Issue 16 point 6: take over a host built by hand from the guide, on the real bed and real systemd hosts.

``ad-1`` is set up exactly per guide-machine-id-kubernetes.txt with the bed's real ``tbot`` (v13.3.8): its bot
``example`` from ``tctl bots add``, ``/etc/tbot.yaml`` (v1, the onboarding token and the CA pin), ``tbot init``
with the guide's flags, the storage directory commands and the guide's unit ``machine-id.service`` (the agent's
own unit name). ``ad-2`` is the same with the unit written under another name, ``tbot.service``, and its own bot
(one bot per renewer: two tbots on one bot would lock it). The one deviation from the guide: the bed's web CA is
added to the hosts' CA bundle (a real proxy has a public certificate).

A check-mode run (``--check --diff``) reports the takeover and changes nothing. While a reader loop of
``kubectl get pods`` runs as ``app`` inside ``ad-1``, ONE rollout switches both hosts to the
agent; then, from outside: no join token was minted, each bot's generation went on (the agent renewed the
identity tbot left, Teleport counts it) and no lock exists, tbot's units are stopped (and ``tbot.service``
disabled), no tbot process runs, the agent runs, every reader iteration succeeded, and a second rollout changes
nothing. ``ad-3``'s tbot identity expired before its first rollout: it gets a token like a new host.
"""

from __future__ import annotations

import json
import time

import pytest
from cryptography import x509

from helpers.fleet import AGENT, Fleet, agent_status, changed_by_host, wait_for
from helpers.reader_loop import cert_generation as _cert_generation
from helpers.reader_loop import locks as _locks
from helpers.reader_loop import server_generation as _server_generation
from helpers.reader_loop import failed, start_loop, stop_loop
from helpers.tbot_by_hand import DEST, STORAGE, build_by_hand, control_plane_by_hand
from helpers.tbot_by_hand import sh as _sh
from helpers.tbot_by_hand import tbot_processes as _tbot_processes

pytestmark = [pytest.mark.testbed, pytest.mark.slow]

GUIDE_HOST, OTHER_UNIT_HOST, EXPIRED_HOST = "ad-1", "ad-2", "ad-3"
BOTS = {GUIDE_HOST: "example", OTHER_UNIT_HOST: "example-ad2", EXPIRED_HOST: "example-ad3"}
UNITS = {GUIDE_HOST: "machine-id", OTHER_UNIT_HOST: "tbot", EXPIRED_HOST: "tbot"}
TAKEOVER_TASK = "Stop (and disable) the hand-built tbot that renews this storage; the agent takes its identity over"


@pytest.fixture(scope="module")
def fleet(bed, tmp_path_factory):
    f = Fleet(tmp_path_factory.mktemp("adopt"), teleport=bed.teleport["multiplex"], kube=bed.kube)
    try:
        f.add_hosts([GUIDE_HOST, OTHER_UNIT_HOST])
        yield f
    finally:
        f.stop()


def _changed_tasks(run) -> list[tuple[str, str]]:
    return [(r["host"], r["task"]) for r in run.results if r["status"] == "ok" and r["result"].get("changed")]


def test_1_one_rollout_takes_over_hand_built_tbot_hosts_with_no_token(fleet, bed, tmp_path):
    tp, kube = fleet.teleport, fleet.kube
    control_plane_by_hand(tp, kube, tmp_path)
    for name in (GUIDE_HOST, OTHER_UNIT_HOST):
        build_by_hand(fleet, bed, name, BOTS[name], UNITS[name])
    guide = fleet.hosts[GUIDE_HOST]
    # what the real tbot v13.3.8 leaves in its storage and destination (recorded in docs/protocol-findings.md)
    print("[tbot storage]", _sh(guide, f"ls -la {STORAGE}").stdout)
    print("[tbot destination]", _sh(guide, f"ls -la {DEST}; getfacl -p {DEST} {DEST}/kubeconfig.yaml",
                                    check=False).stdout)
    print("[tbot kubeconfig exec]", _sh(guide, f"grep -A6 'exec:' {DEST}/kubeconfig.yaml", check=False).stdout)
    before = {}
    for name in (GUIDE_HOST, OTHER_UNIT_HOST):
        pem = (fleet.hosts[name].root / STORAGE.lstrip("/") / "tlscert").read_bytes()
        before[name] = (_cert_generation(pem), _server_generation(tp, BOTS[name]))
        assert before[name][0] == before[name][1], before  # tbot's last renewal is what Teleport counts
    assert "bot-example" not in _locks(tp)

    # check mode with --diff: no token, the takeover reported as a change for each host, nothing changed on them
    tokens = fleet.token_creations()
    check = fleet.rollout(check=True, diff=True)
    assert check.rc == 0, check.stdout[-6000:]
    takeover = [r for r in check.results if r["task"].endswith(TAKEOVER_TASK)]
    assert sorted(r["host"] for r in takeover if r["result"].get("changed")) == [GUIDE_HOST, OTHER_UNIT_HOST], \
        takeover
    assert fleet.token_creations() == tokens
    for name in (GUIDE_HOST, OTHER_UNIT_HOST):
        host = fleet.hosts[name]
        assert _sh(host, f"systemctl is-active {UNITS[name]}", check=False).stdout.strip() == "active"
        assert _tbot_processes(host) and not (host.root / STORAGE.lstrip("/") / "identity.json").exists()

    # the reader loop, as `app`, inside ad-1, through the whole switch
    start_loop(guide, "ad-reader-loop", DEST)

    tokens = fleet.token_creations()
    calls = fleet.tctl_calls()
    run = fleet.rollout()
    assert run.rc == 0, run.stdout[-8000:]
    time.sleep(3)  # a few more reader iterations after the rollout
    loop = stop_loop(guide, "ad-reader-loop")
    bad = failed(loop)
    assert not bad, bad[:10]
    assert any("/usr/local/bin/tbot" in line for line in loop), "the loop did not start on tbot's kubeconfig"
    assert any(AGENT in line for line in loop), "the loop did not reach the agent's kubeconfig"

    # 0 join tokens: none minted (audit events + `tctl bots add`), no bot or token call by the rollout
    assert fleet.token_creations() == tokens
    new_calls = fleet._calls()[calls:]
    assert not [c for c in new_calls if c[:2] in (["bots", "add"], ["tokens", "add"], ["bots", "rm"])], new_calls
    for name in (GUIDE_HOST, OTHER_UNIT_HOST):
        host = fleet.hosts[name]
        status = agent_status(host)
        assert status["identity"]["state"] == "ok" and status["identity"]["bot"] == BOTS[name], status
        # the bot's generation went on in the agent's hands, and Teleport counts it: no lock
        stored = json.loads((host.root / STORAGE.lstrip("/") / "identity.json").read_text())
        gen = _cert_generation(stored["tlscert"].encode())
        assert gen > before[name][0], (name, gen, before[name])
        assert wait_for(lambda: _server_generation(tp, BOTS[name]) == gen, timeout=30), \
            (name, gen, _server_generation(tp, BOTS[name]))
        assert f"bot-{BOTS[name]}" not in _locks(tp)
        # tbot is gone: no process, its identity files moved aside, its unit stopped (another name: disabled)
        assert not _tbot_processes(host), _tbot_processes(host)
        assert not (host.root / STORAGE.lstrip("/") / "tlscert").exists()
        assert (host.root / STORAGE.lstrip("/") / "adopted-from-tbot" / "tlscert").exists()
        show = _sh(host, "systemctl show machine-id -p ActiveState -p ExecStart").stdout
        assert "ActiveState=active" in show and AGENT in show, show
        journal = _sh(host, "journalctl -u machine-id --no-pager -o cat", check=False).stdout
        assert "adopted the identity tbot left in" in journal, journal[-3000:]
        assert "joining the cluster" not in journal
        assert fleet.reader_get_pods(name).returncode == 0
    tbot_unit = fleet.hosts[OTHER_UNIT_HOST]
    assert _sh(tbot_unit, "systemctl is-active tbot", check=False).stdout.strip() == "inactive"
    assert _sh(tbot_unit, "systemctl is-enabled tbot", check=False).stdout.strip() == "disabled"
    # the kubeconfig tbot wrote before the switch still works on the agent's files: a client that loaded it (a
    # kubectl started just before the switch, a long-running reader) runs `tbot kube credentials`, which reads the
    # destination's `identity` file and refuses one without an SSH certificate line
    creds = _sh(guide, f"runuser -u app -- /usr/local/bin/tbot kube credentials --destination-dir={DEST}",
                check=False)
    assert creds.returncode == 0 and '"kind":"ExecCredential"' in creds.stdout.replace(" ", ""), creds.stderr[-500:]

    # a second rollout changes nothing, still no token
    run2 = fleet.rollout()
    assert run2.rc == 0, run2.stdout[-6000:]
    assert changed_by_host(run2) == {GUIDE_HOST: 0, OTHER_UNIT_HOST: 0}, _changed_tasks(run2)
    assert fleet.token_creations() == tokens


def test_2_an_expired_tbot_identity_gets_a_token_like_a_new_host(fleet, bed):
    """ad-3: tbot ran with 1-minute certificates (short on purpose: only its expiry is under test), was stopped,
    and its identity expired before the rollout."""
    fleet.add_hosts([EXPIRED_HOST])
    host = fleet.hosts[EXPIRED_HOST]
    build_by_hand(fleet, bed, EXPIRED_HOST, BOTS[EXPIRED_HOST], UNITS[EXPIRED_HOST], extra_config={"certificate_ttl": "1m", "renewal_interval": "30s"})
    _sh(host, "systemctl stop tbot")
    pem = (host.root / STORAGE.lstrip("/") / "tlscert").read_bytes()
    not_after = x509.load_pem_x509_certificate(pem).not_valid_after_utc.timestamp()
    time.sleep(max(0.0, not_after - time.time()) + 2)
    tokens = fleet.token_creations()
    run = fleet.rollout()
    assert run.rc == 0, run.stdout[-8000:]
    assert fleet.token_creations() == tokens + 1  # one new token, for ad-3 only
    status = agent_status(host)
    assert status["identity"]["state"] == "ok", status
    assert status["identity"]["bot"] == f"{fleet.bot_name}-{EXPIRED_HOST}"  # a new host's bot
    journal = _sh(host, "journalctl -u machine-id --no-pager -o cat", check=False).stdout
    assert "not adopting tbot's identity" in journal and "expired at" in journal, journal[-3000:]
    assert fleet.reader_get_pods(EXPIRED_HOST).returncode == 0
    changed = _changed_tasks(run)
    print("[changed tasks, third rollout]", changed)
    assert not [c for c in changed if c[0] in (GUIDE_HOST, OTHER_UNIT_HOST)], changed
