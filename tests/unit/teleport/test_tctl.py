# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The tctl client: argv building, version detection, error mapping, parsing of recorded v13 output."""

from __future__ import annotations

import base64
import datetime
import json

import pytest

from ansible_collections.lanyard.machine_id.plugins.module_utils import _tctl
from ansible_collections.lanyard.machine_id.plugins.module_utils._errors import LanyardError

from conftest import FakeTctl, recorded


def test_argv_puts_connection_flags_first_and_uses_timeout():
    fake = FakeTctl()
    t = _tctl.Tctl(fake, "/opt/tctl", auth_server="127.0.0.1:3025", identity_file="/id.pem", insecure=True,
                   timeout=30, timeout_bin="/usr/bin/timeout")
    assert t.argv(["get", "role/x"]) == ["/usr/bin/timeout", "--kill-after=5", "30s", "/opt/tctl",
                                         "--auth-server=127.0.0.1:3025", "-i", "/id.pem", "--insecure",
                                         "get", "role/x"]
    assert t.argv(["version"], connect=False) == ["/usr/bin/timeout", "--kill-after=5", "30s", "/opt/tctl", "version"]
    local = _tctl.Tctl(fake, "/opt/tctl", config_file="/etc/teleport.yaml")
    assert local.argv(["status"]) == ["/opt/tctl", "-c", "/etc/teleport.yaml", "status"]


def test_version_detected_once_and_only_when_asked(tmp_path):
    cfg = tmp_path / "teleport.yaml"
    cfg.write_text("{}")
    fake = FakeTctl(version_text=recorded("v13_version.txt"))
    fake.on("get", out="[]")
    t = fake.client(config_file=str(cfg))
    t.get("roles")
    t.get("roles")
    # a call that needs no feature switch runs tctl once: no `tctl version` before it
    assert [call[0] for call in fake.calls] == [["get", "roles", "--format=json"]] * 2
    v = t.version()
    assert t.version() is v and [call[0] for call in fake.calls].count(["version"]) == 1
    assert str(v) == "13.3.8" and not v.has_bots_update and not v.has_bot_instances
    assert not v.has_bot_max_session_ttl


@pytest.mark.parametrize("text,major,update,instances", [
    ("Teleport v13.3.8 git: go1.21.13", 13, False, False),
    ("Teleport v15.4.0 git:v15.4.0-0-gabc go1.21.9", 15, True, False),
    ("Teleport Enterprise v17.0.1 git:v17.0.1 go1.23.3", 17, True, True),
    ("Teleport v18.2.0 git:v18.2.0-0-g1 go1.24.7\nProxy version: 18.2.0", 18, True, True),
])
def test_version_features(text, major, update, instances):
    v = _tctl.TctlVersion.parse(text)
    assert (v.major, v.has_bots_update, v.has_bot_instances) == (major, update, instances)


def test_version_garbage_is_a_clear_error():
    with pytest.raises(LanyardError, match="Cannot read the tctl version"):
        _tctl.TctlVersion.parse("command not found")


def test_parse_recorded_status():
    info = _tctl.parse_status(recorded("v13_status.txt"))
    assert info["cluster_name"] == "lanyard-testbed"
    assert info["version"] == "13.3.8"
    assert len(info["ca_pins"]) == 1 and info["ca_pins"][0].startswith("sha256:") and len(info["ca_pins"][0]) == 71


def test_status_without_pin_fails():
    with pytest.raises(LanyardError, match="no CA pin"):
        _tctl.parse_status("Cluster x\nVersion 13.3.8\n")


@pytest.mark.parametrize("name,kind", [
    ("v13_err_unreachable.txt", "unreachable"),
    ("v13_err_denied.txt", "denied"),
    ("v13_err_role_not_found.txt", "not_found"),
    ("v13_err_user_not_found.txt", "not_found"),
])
def test_classify_recorded_errors(name, kind):
    text = _tctl._ANSI_RE.sub("", recorded(name))
    assert _tctl.classify_error(text) == kind


def test_unreachable_error_names_the_address():
    fake = FakeTctl().on("get", rc=1, err=recorded("v13_err_unreachable.txt"))
    t = _tctl.Tctl(fake, "/opt/tctl", auth_server="127.0.0.1:1")
    with pytest.raises(LanyardError) as exc:
        t.get("roles")
    assert "127.0.0.1:1" in exc.value.msg and "Fix:" in exc.value.msg and "\x1b" not in exc.value.msg


def test_denied_error_names_the_identity(tmp_path):
    ident = tmp_path / "id.pem"
    ident.write_text("x")
    fake = FakeTctl().on("get", rc=1, err=recorded("v13_err_denied.txt"))
    t = _tctl.Tctl(fake, "/opt/tctl", auth_server="127.0.0.1:3025", identity_file=str(ident))
    with pytest.raises(LanyardError) as exc:
        t.get("role/editor")
    assert "permission denied for identity file %s" % ident in exc.value.msg
    assert 'access denied to perform action "read" on "role"' in exc.value.msg


def _identity_with_cert(path, not_after):
    """An identity-file-shaped PEM whose first certificate has the given notAfter (only what we parse)."""
    def tlv(tag, body):
        n = len(body)
        if n < 128:
            return bytes([tag, n]) + body
        ln = n.to_bytes((n.bit_length() + 7) // 8, "big")
        return bytes([tag, 0x80 | len(ln)]) + ln + body

    def t(when):
        return tlv(0x17, when.strftime("%y%m%d%H%M%SZ").encode())
    tbs = tlv(0x30, tlv(0xA0, tlv(0x02, b"\x02")) + tlv(0x02, b"\x01") + tlv(0x30, b"") + tlv(0x30, b"")
              + tlv(0x30, t(not_after - datetime.timedelta(hours=1)) + t(not_after)) + tlv(0x30, b"") + tlv(0x30, b""))
    cert = tlv(0x30, tbs + tlv(0x30, b"") + tlv(0x03, b"\x00"))
    path.write_text("-----BEGIN RSA PRIVATE KEY-----\nAAAA\n-----END RSA PRIVATE KEY-----\nssh-rsa-cert AAAA\n"
                    "-----BEGIN CERTIFICATE-----\n%s\n-----END CERTIFICATE-----\n" % base64.b64encode(cert).decode())


def test_expired_identity_is_reported_as_expired(tmp_path):
    now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    old, fresh = tmp_path / "old.pem", tmp_path / "fresh.pem"
    _identity_with_cert(old, now - datetime.timedelta(minutes=5))
    _identity_with_cert(fresh, now + datetime.timedelta(hours=5))
    assert _tctl.identity_expired(str(old)) and not _tctl.identity_expired(str(fresh))
    # v13 says "Cannot connect to the auth server" for an expired identity; we tell the truth.
    fake = FakeTctl().on("get", rc=1, err=recorded("v13_err_unreachable.txt"))
    with pytest.raises(LanyardError, match="has expired") as exc:
        _tctl.Tctl(fake, "/opt/tctl", auth_server="127.0.0.1:3025", identity_file=str(old)).get("roles")
    assert "tctl auth sign" in exc.value.msg
    with pytest.raises(LanyardError, match="could not reach"):
        _tctl.Tctl(fake, "/opt/tctl", auth_server="127.0.0.1:3025", identity_file=str(fresh)).get("roles")


def test_missing_identity_file_fails_before_running(tmp_path):
    fake = FakeTctl()
    with pytest.raises(LanyardError, match="identity_file .* does not exist"):
        _tctl.Tctl(fake, "/opt/tctl", identity_file=str(tmp_path / "nope.pem")).version()
    with pytest.raises(LanyardError, match="identity_file .* does not exist"):
        _tctl.Tctl(fake, "/opt/tctl", identity_file=str(tmp_path / "nope.pem")).get("roles")
    assert fake.calls == []


def test_timeout_is_reported():
    fake = FakeTctl().on("get", rc=124)
    t = _tctl.Tctl(fake, "/opt/tctl", auth_server="10.0.0.1:3025", timeout=5, timeout_bin="/usr/bin/timeout")
    with pytest.raises(LanyardError, match="timed out after 5s .* 10.0.0.1:3025"):
        t.get("roles")


def test_secrets_are_masked_in_errors():
    fake = FakeTctl().on("create", rc=1, err='ERROR: token "s3cr3tvalue" is invalid\n')
    with pytest.raises(LanyardError) as exc:
        fake.client().create({"metadata": {"name": "s3cr3tvalue"}}, "mint", secrets=["s3cr3tvalue"])
    assert "s3cr3tvalue" not in exc.value.msg and "s3cr3tvalue" not in json.dumps(exc.value.details)


OTHER_TOKEN = "5f2c1e0a9b8d7c6e5f4a3b2c1d0e9f8a"   # 32 hex digits, the shape of a Teleport join token


@pytest.mark.parametrize("err", [
    "ERROR: key \"/tokens/%s\" is not found\n" % OTHER_TOKEN,
    "ERROR: The bot token: %s\n" % OTHER_TOKEN,
    "ERROR: failed to upsert token %s: conflict\n" % OTHER_TOKEN,
    "ERROR: token_id=%s rejected\n" % OTHER_TOKEN,
    "ERROR: bad provision token \"%s\"\n" % OTHER_TOKEN,
    "ERROR: key /tokens/%s already exists\n" % OTHER_TOKEN,
])
def test_token_shaped_text_from_tctl_is_redacted(err):
    """Error messages built from tctl output never carry a token, even one the module did not pass as secret."""
    fake = FakeTctl().on("create", rc=1, err=err)
    with pytest.raises(LanyardError) as exc:
        fake.client().create({"kind": "token"}, "mint a join token")
    assert OTHER_TOKEN not in exc.value.msg and OTHER_TOKEN not in json.dumps(exc.value.details)
    assert _tctl.MASK in exc.value.msg


def test_redact_shapes_and_what_it_keeps():
    pem = "-----BEGIN RSA PRIVATE KEY-----\nMIIEabc\n-----END RSA PRIVATE KEY-----"
    jwt = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJib3QtZXhhbXBsZSJ9.c2lnbmF0dXJl"
    text = "key %s jwt %s token: abcdefghijklmnopqrstu secret-x" % (pem, jwt)
    out = _tctl.redact(text, secrets=["secret-x"])
    for leaked in ("MIIEabc", jwt, "abcdefghijklmnopqrstu", "secret-x"):
        assert leaked not in out
    # ordinary error text stays readable
    for keep in ("token expired or not found", 'role "machine-id-kube-role" is not found',
                 "user bot-example has already been issued a renewable certificate"):
        assert _tctl.redact(keep) == keep


def test_version_and_json_errors_are_redacted():
    fake = FakeTctl(version_text="garbage %s\n" % OTHER_TOKEN)
    with pytest.raises(LanyardError) as exc:
        fake.client().version()
    assert OTHER_TOKEN not in exc.value.msg
    fake = FakeTctl().on("get", out="not json: token %s" % OTHER_TOKEN)
    with pytest.raises(LanyardError) as exc:
        fake.client().get("tokens")
    assert OTHER_TOKEN not in exc.value.msg and "not JSON" in exc.value.msg


def test_create_passes_resource_on_stdin_only():
    fake = FakeTctl().on("create", out="")
    fake.client().create({"kind": "token", "metadata": {"name": "topsecret"}}, "mint", force=True)
    args, data = fake.calls[-1]
    assert args == ["create", "-f", "-"] and "topsecret" in data
    assert not any("topsecret" in a for argv in fake.argvs for a in argv)


def test_get_not_found_is_empty_and_json_is_parsed():
    fake = FakeTctl().on("get", "role/nope", rc=1, err=recorded("v13_err_role_not_found.txt"))
    fake.on("get", "role/machine-id-kube-role", out=recorded("v13_get_role_guide.json"))
    t = fake.client()
    assert t.get("role/nope") == []
    assert t.get("role/machine-id-kube-role")[0]["metadata"]["name"] == "machine-id-kube-role"


def test_non_json_output_is_a_clear_error():
    fake = FakeTctl().on("get", out="Bot  User\n")
    with pytest.raises(LanyardError, match="not JSON"):
        fake.client().get("roles")


class _Module:
    def __init__(self, params, bins):
        self.params = params
        self._bins = bins

    def get_bin_path(self, name):
        return self._bins.get(name)


def test_tctl_not_found_messages(tmp_path):
    params = dict(tctl_path=None, auth_server=None, identity_file=None, config_file=None, insecure=False, timeout=60)
    with pytest.raises(LanyardError, match="tctl not found in PATH"):
        _tctl.tctl_from_module(_Module(params, {}))
    params["tctl_path"] = str(tmp_path / "tctl")
    with pytest.raises(LanyardError, match="tctl not found at tctl_path=.*/tctl"):
        _tctl.tctl_from_module(_Module(params, {}))


def test_expired_credentials_text_is_classified_as_expired():
    """v13.3.8 under load answered an expired identity file with this text (real-bed run, issue 13 work)."""
    text = "ERROR: your credentials have expired, please login using `tsh login`"
    assert _tctl.classify_error(text) == "expired"
