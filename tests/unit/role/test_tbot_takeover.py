# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""agent_state on a host set up by hand with tbot: the dependency-free judge of tbot's storage files (it must
agree with the agent's own import, which uses ``cryptography``), and which units the role takes over."""

from __future__ import annotations

import datetime as dt
import sys
from pathlib import Path

import pytest

from ansible_collections.lanyard.machine_id.plugins.module_utils import _host_drift as drift
from ansible_collections.lanyard.machine_id.plugins.module_utils import _host_state as host
from ansible_collections.lanyard.machine_id.plugins.module_utils import _tbot_storage as tbot
from machine_id_agent import identity as ident
from machine_id_agent import tbot_import

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "agent"))
from test_identity import _cert  # noqa: E402
from test_tbot_import import write_tbot  # noqa: E402

STORAGE = "/var/lib/teleport/bot"


@pytest.fixture(scope="module")
def key_pem():
    return ident.generate_key()


def _both(storage):
    """The module's verdict and the agent's (status) verdict on the same files."""
    verdict = tbot.judge(host.tbot_files(str(storage)), str(storage))
    try:
        agent = tbot_import.peek(storage)
        agent_state = "ok" if agent is not None else None
    except tbot_import.TbotIdentityError as exc:
        agent_state = exc.state
    return verdict, agent_state


def test_good_identity_is_ok_and_carries_bot_and_generation(tmp_path, key_pem):
    write_tbot(tmp_path / "bot", key_pem, generation="12")
    verdict, agent = _both(tmp_path / "bot")
    assert agent == "ok"
    assert (verdict["valid"], verdict["state"], verdict["source"], verdict["bot"], verdict["generation"]) == (
        True, "ok", "tbot", "example", 12)
    assert verdict["problem"] is None and verdict["seconds_to_expiry"] > 3000


def test_pkcs8_key_is_compared_too(tmp_path, key_pem):
    from cryptography.hazmat.primitives import serialization
    pk = serialization.load_pem_private_key(key_pem, None)
    pkcs8 = pk.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    assert tbot.key_public(pkcs8) == tbot.key_public(key_pem) and tbot.key_public(key_pem)


@pytest.mark.parametrize("case, state, words", [
    ("partial", "damaged", "incomplete (tlscacerts missing or empty)"),
    ("mismatched", "damaged", "mismatched: key is not the key of tlscert"),
    ("expired", "expired", "expired at"),
    ("not-renewable", "damaged", "not a renewable bot identity"),
    ("garbage", "damaged", "does not parse"),
])
def test_unusable_identity_gets_a_token_and_agrees_with_the_agent(tmp_path, key_pem, case, state, words):
    storage = tmp_path / "bot"
    if case == "partial":
        write_tbot(storage, key_pem, skip=("tlscacerts",))
    elif case == "mismatched":
        write_tbot(storage, key_pem, cert=_cert(ident.generate_key()))
    elif case == "expired":
        write_tbot(storage, key_pem, hours=-0.005)
    elif case == "not-renewable":
        write_tbot(storage, key_pem, renewable=None)
    else:
        write_tbot(storage, key_pem, cert=b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    verdict, agent = _both(storage)
    assert (verdict["valid"], verdict["state"]) == (False, state)
    assert agent == state
    assert words in verdict["problem"] and "join token" in verdict["fix"]


def test_expiry_is_judged_at_the_time_given(tmp_path, key_pem):
    write_tbot(tmp_path / "bot", key_pem, hours=1)
    files = host.tbot_files(str(tmp_path / "bot"))
    later = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None) + dt.timedelta(hours=2)
    assert tbot.judge(files, "x", now=later)["state"] == "expired"


def test_no_tbot_files_no_verdict(tmp_path):
    assert tbot.judge(host.tbot_files(str(tmp_path / "none")), "x") is None
    (tmp_path / "bot").mkdir()
    (tmp_path / "bot" / "lock").write_bytes(b"")
    assert tbot.judge(host.tbot_files(str(tmp_path / "bot")), "x") is None


def test_tbot_files_never_follow_a_symlink(tmp_path, key_pem):
    write_tbot(tmp_path / "real", key_pem)
    (tmp_path / "bot").mkdir()
    (tmp_path / "bot" / "tlscert").symlink_to(tmp_path / "real" / "tlscert")
    assert "tlscert" not in host.tbot_files(str(tmp_path / "bot"))


# --- which units are taken over ---------------------------------------------------------------------------------
GUIDE_EXEC = ("{ path=/usr/local/bin/tbot ; argv[]=/usr/local/bin/tbot start -c /etc/tbot.yaml ; ignore_errors=no ; "
              "start_time=[n/a] ; stop_time=[n/a] ; pid=0 ; code=(null) ; status=0/0 }")
LOADED = {"LoadState": "loaded", "ActiveState": "active", "UnitFileState": "enabled", "ExecStart": GUIDE_EXEC}
GUIDE_CONFIG = "storage:\n  directory: /var/lib/teleport/bot\ndestinations:\n  - directory: /opt/machine-id\n"


def test_exec_argv_and_config_path():
    argv = ["/usr/local/bin/tbot", "start", "-c", "/etc/tbot.yaml"]
    assert tbot.exec_argv(GUIDE_EXEC) == ("/usr/local/bin/tbot", argv)
    assert tbot.tbot_config_path(["tbot", "start", "--config=/x.yaml"]) == "/x.yaml"
    assert tbot.tbot_config_path(["tbot", "start"]) is None
    assert tbot.exec_argv("") == ("", [])


def test_the_guides_unit_under_the_agents_name_is_taken_over():
    got = drift.tbot_takeover("machine-id.service", LOADED, "/usr/local/bin/tbot", [], None, STORAGE, own=True)
    assert got == {"name": "machine-id.service", "own": True, "active": True, "enabled": True}
    assert drift.takeover_drift([got], STORAGE) == [
        "machine-id.service: runs tbot on /var/lib/teleport/bot, expected replaced by the agent's unit (the agent "
        "takes that identity over)"]


def test_another_unit_only_when_it_renews_this_storage():
    argv = tbot.exec_argv(GUIDE_EXEC)[1]
    got = drift.tbot_takeover("tbot.service", LOADED, argv[0], argv, GUIDE_CONFIG, STORAGE, own=False)
    assert got == {"name": "tbot.service", "own": False, "active": True, "enabled": True}
    assert "expected stopped and disabled" in drift.takeover_drift([got], STORAGE)[0]
    # an unrelated tbot (another storage) is left alone
    other = GUIDE_CONFIG.replace("/var/lib/teleport/bot", "/var/lib/other-bot")
    assert drift.tbot_takeover("tbot.service", LOADED, argv[0], argv, other, STORAGE, own=False) is None
    # named on the command line (--data-dir) counts too; a prefix does not
    cli = ["/usr/bin/tbot", "start", "--data-dir=/var/lib/teleport/bot/"]
    assert drift.tbot_takeover("tbot.service", LOADED, cli[0], cli, None, STORAGE, own=False)
    assert drift.tbot_takeover("tbot.service", LOADED, cli[0], ["tbot", "--data-dir=/var/lib/teleport"], None,
                               STORAGE, own=False) is None


@pytest.mark.parametrize("props", [
    dict(LOADED, ActiveState="inactive", UnitFileState="disabled"),  # already taken over: nothing to do
    dict(LOADED, LoadState="not-found"),
])
def test_stopped_disabled_or_missing_units_are_not_taken_over(props):
    assert drift.tbot_takeover("machine-id.service", props, "/usr/local/bin/tbot", [], None, STORAGE, True) is None


def test_the_agents_own_unit_is_never_taken_over():
    props = dict(LOADED, ExecStart="{ path=/opt/machine-id-agent/bin/machine-id-agent ; argv[]=... }")
    program, argv = tbot.exec_argv(props["ExecStart"])
    assert drift.tbot_takeover("machine-id.service", props, program, argv, None, STORAGE, own=True) is None
