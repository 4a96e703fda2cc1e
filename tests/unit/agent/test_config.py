# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""machine-id-agent config: the guide's v1 file, the v2 shape, and one-line errors for bad files."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from machine_id_agent import config
from machine_id_agent.errors import ConfigError

PIN = "sha256:" + "ab" * 32

# /etc/tbot.yaml exactly as the guide writes it (pin made well-formed: the guide's sample has 'g'/'h').
GUIDE = """\
auth_server: "teleport.example.com:443"
onboarding:
  join_method: "token"
  token: "abcd123-insecure-do-not-use-this"
  ca_pins:
  - "%s"
storage:
  directory: /var/lib/teleport/bot
destinations:
  - directory: /opt/machine-id
    kubernetes_cluster: example-k8s-cluster
""" % PIN

V2 = {
    "version": "v2",
    "proxy_server": "teleport.example.com:443",
    "onboarding": {"join_method": "token", "token": "tok-123"},
    "storage": {"type": "directory", "path": "/var/lib/teleport/bot"},
    "outputs": [{"type": "kubernetes", "kubernetes_cluster": "k1",
                 "destination": {"type": "directory", "path": "/opt/k1"}, "roles": ["kube-reader"],
                 "reload_command": ["systemctl", "reload", "app"], "readers": ["root"]}],
    "services": [{"type": "kubernetes", "kubernetes_cluster": "k2",
                  "destination": {"type": "directory", "path": "/opt/k2"}, "exec_plugin": False}],
    "credential_ttl": "30m",
    "renewal_interval": "10m",
    "acls": "required",
    "diag_addr": "127.0.0.1:9191",
}


def test_guide_file_loads_with_tbot_defaults(tmp_path):
    p = tmp_path / "tbot.yaml"
    p.write_text(GUIDE)
    cfg = config.load(p)
    assert cfg.auth_server == "teleport.example.com:443" and cfg.proxy_server is None
    assert cfg.token == "abcd123-insecure-do-not-use-this"
    assert cfg.ca_pins == [PIN]
    assert cfg.storage_dir == Path("/var/lib/teleport/bot")
    want = [("/opt/machine-id", "example-k8s-cluster")]
    assert [(str(o.destination), o.kubernetes_cluster) for o in cfg.outputs] == want
    assert (cfg.credential_ttl, cfg.renewal_interval, cfg.acls) == (3600, 1200, "try")
    assert cfg.outputs[0].exec_plugin, "the guide's config gets the exec-plugin kubeconfig by default"
    assert "abcd123" not in repr(cfg), "the token must not show in repr (logs)"


def test_v2_outputs_and_services(tmp_path):
    cfg = config.parse(copy.deepcopy(V2), tmp_path / "x.yaml")
    assert cfg.proxy_server == "teleport.example.com:443"
    assert [o.kubernetes_cluster for o in cfg.outputs] == ["k1", "k2"]
    k1, k2 = cfg.outputs
    assert k1.roles == ["kube-reader"] and k1.reload_command == ["systemctl", "reload", "app"]
    # exec_plugin defaults to true (like tbot); false opts an output out (inline credentials)
    assert k1.readers == ["root"] and k1.exec_plugin and not k2.exec_plugin
    want = (1800, 600, "required", "127.0.0.1:9191")
    assert (cfg.credential_ttl, cfg.renewal_interval, cfg.acls, cfg.diag_addr) == want


def test_token_from_file(tmp_path):
    tok = tmp_path / "token"
    tok.write_text("file-token-value\n")
    d = yaml.safe_load(GUIDE)
    d["onboarding"]["token"] = str(tok)
    cfg = config.parse(d, tmp_path / "tbot.yaml")
    assert cfg.token == "file-token-value" and cfg.token_path == tok


@pytest.mark.parametrize("text,seconds", [("1h", 3600), ("20m", 1200), ("90s", 90), ("1h30m", 5400),
                                          ("1.5h", 5400), ("1500ms", 2), ("0", 0)])
def test_go_durations(text, seconds):
    assert config.parse_duration(text, "k") == seconds


def _mut(path, value):
    def f(d):
        cur = d
        for k in path[:-1]:
            cur = cur[k]
        if value is _DEL:
            del cur[path[-1]]
        else:
            cur[path[-1]] = value
    return f


_DEL = object()

BAD_V1 = [
    ("unknown key", _mut(["renewl_interval"], "1m"), "renewl_interval: unknown key; did you mean 'renewal_interval'?"),
    ("unknown nested key", _mut(["onboarding", "tokn"], "x"), "onboarding.tokn: unknown key; did you mean 'token'?"),
    ("missing token", _mut(["onboarding", "token"], _DEL), "onboarding.token: missing"),
    ("malformed pin", _mut(["onboarding", "ca_pins"], ["sha256:abc"]), "onboarding.ca_pins[0]: 'sha256:abc' is not a CA pin"),
    ("pin not a list", _mut(["onboarding", "ca_pins"], PIN), "onboarding.ca_pins: expected a list"),
    ("ttl too long", _mut(["certificate_ttl"], "48h"), "certificate_ttl: 48h is out of range"),
    ("ttl not a duration", _mut(["certificate_ttl"], 3600), "certificate_ttl: 3600 is not a duration"),
    ("ttl no unit", _mut(["certificate_ttl"], "10"), "certificate_ttl: '10' is not a duration"),
    ("renewal >= ttl", _mut(["renewal_interval"], "2h"), "renewal_interval: 2h is not shorter than certificate_ttl 1h"),
    ("wrong type", _mut(["destinations", 0, "kubernetes_cluster"], ["x"]),
     "destinations[0].kubernetes_cluster: expected a string, got a list"),
    ("no cluster", _mut(["destinations", 0, "kubernetes_cluster"], _DEL), "destinations[0].kubernetes_cluster: missing"),
    ("relative dir", _mut(["destinations", 0, "directory"], "opt/x"), "destinations[0].directory: 'opt/x' is not an absolute path"),
    ("no address", _mut(["auth_server"], _DEL), "auth_server: missing"),
    ("scheme", _mut(["auth_server"], "https://t.example.com:443"), "auth_server: 'https://t.example.com:443' has a URL scheme"),
    ("no port", _mut(["auth_server"], "t.example.com"), "auth_server: 't.example.com' needs a port"),
    ("join method", _mut(["onboarding", "join_method"], "iam"), "onboarding.join_method: 'iam' is not supported"),
    ("acls value", _mut(["acls"], "requried"), "acls: 'requried' is not one of try, required, off; did you mean 'required'?"),
    ("insecure type", _mut(["insecure"], "yes please"), "insecure: expected true or false"),
    ("v2 key in v1", _mut(["credential_ttl"], "1h"), "credential_ttl: unknown key; did you mean 'certificate_ttl'?"),
    ("no outputs", _mut(["destinations"], []), "destinations: no outputs"),
    ("storage = dest", _mut(["storage", "directory"], "/opt/machine-id"), "is also the storage directory"),
    ("reload not list", _mut(["destinations", 0, "reload_command"], "systemctl reload app"),
     "destinations[0].reload_command: expected a list, got a string"),
    ("bad reader", _mut(["destinations", 0, "readers"], ["bad user"]), "destinations[0].readers[0]: 'bad user' is not a valid user name"),
]


@pytest.mark.parametrize("name,mutate,expected", BAD_V1, ids=[b[0] for b in BAD_V1])
def test_bad_v1_names_key_and_fix(name, mutate, expected):
    d = yaml.safe_load(GUIDE)
    mutate(d)
    with pytest.raises(ConfigError) as ei:
        config.parse(d)
    msg = str(ei.value)
    assert expected in msg, msg
    assert "\n" not in msg
    assert "abcd123" not in msg


BAD_V2 = [
    ("output type", _mut(["outputs", 0, "type"], "identity"), "outputs[0].type: 'identity' is not supported"),
    ("no destination", _mut(["outputs", 0, "destination"], _DEL), "outputs[0].destination: missing"),
    ("dest type", _mut(["outputs", 0, "destination", "type"], "memory"), "outputs[0].destination.type: 'memory'"),
    ("storage type", _mut(["storage", "type"], "memory"), "storage.type: 'memory' is not supported"),
    ("both addresses", _mut(["auth_server"], "auth.example.com:3025"), "auth_server, proxy_server: both are set"),
    ("services unknown", _mut(["services", 0, "destinaton"], {}), "services[0].destinaton: unknown key; did you mean 'destination'?"),
    ("ttl too short", _mut(["credential_ttl"], "5s"), "credential_ttl: 5s is out of range"),
    ("duplicate dest", _mut(["services", 0, "destination", "path"], "/opt/k1"), "directory /opt/k1 is used by two outputs"),
    ("diag addr", _mut(["diag_addr"], "9191"), "diag_addr: '9191' needs a port"),
]


@pytest.mark.parametrize("name,mutate,expected", BAD_V2, ids=[b[0] for b in BAD_V2])
def test_bad_v2_names_key_and_fix(name, mutate, expected):
    d = copy.deepcopy(V2)
    mutate(d)
    with pytest.raises(ConfigError) as ei:
        config.parse(d)
    assert expected in str(ei.value), str(ei.value)


def test_missing_token_file_is_explained_when_a_join_needs_it(tmp_path):
    """Issue 11 point 7: a missing token file does not stop loading the config (a host with a valid identity
    keeps running after the spent token was deleted); it is an error only when a join needs the token."""
    d = yaml.safe_load(GUIDE)
    d["onboarding"]["token"] = str(tmp_path / "nope")
    cfg = config.parse(d)
    assert cfg.token is None and cfg.token_path == tmp_path / "nope"
    assert config.read_token(cfg) is None
    with pytest.raises(ConfigError, match=r"onboarding.token: token file .*nope does not exist"):
        config.read_token(cfg, required=True)
    (tmp_path / "nope").write_text("later-token\n")
    assert config.read_token(cfg, required=True) == "later-token"
    (tmp_path / "nope").write_text("\n")
    with pytest.raises(ConfigError, match=r"token file .*nope is empty"):
        config.read_token(cfg, required=True)


def test_yaml_syntax_error_has_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("auth_server: [\nonboarding: x\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: line \d+ column \d+"):
        config.load(p)


@pytest.mark.parametrize("content,needle", [
    (GUIDE.replace("renewal_interval", "x") + "certificate_ttl: 30h\n", "certificate_ttl: 30h is out of range"),
    (GUIDE + "proxy_servr: a:1\n", "did you mean 'proxy_server'?"),
])
def test_check_command_exit_2_one_line_no_traceback(tmp_path, content, needle):
    p = tmp_path / "tbot.yaml"
    p.write_text(content)
    r = subprocess.run([sys.executable, "-m", "machine_id_agent", "check", "-c", str(p)],
                       capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 2, r
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""


def test_check_command_accepts_guide_file(tmp_path):
    p = tmp_path / "tbot.yaml"
    p.write_text(GUIDE)
    r = subprocess.run([sys.executable, "-m", "machine_id_agent", "check", "-c", str(p)],
                       capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0 and r.stdout.startswith("ok: "), r


# ----- issue 11: tbot's per-directory symlinks/acls are honoured, readers: is authoritative when present ----

def test_directory_symlinks_and_acls_are_parsed_not_ignored(tmp_path):
    d = yaml.safe_load(GUIDE)
    d["storage"] = {"directory": {"path": "/var/lib/teleport/bot", "symlinks": "secure", "acls": "off"}}
    d["destinations"] = [
        {"directory": {"path": "/opt/a", "symlinks": "insecure", "acls": "required"}, "kubernetes_cluster": "k"},
        {"directory": "/opt/b", "kubernetes_cluster": "k", "readers": []},
    ]
    cfg = config.parse(d, tmp_path / "x.yaml")
    assert (cfg.storage_symlinks, cfg.storage_acls) == ("secure", "off")
    a, b = cfg.outputs
    assert (a.symlinks, a.acls, a.readers_managed) == ("insecure", "required", False)
    # tbot's defaults; acls falls back to the top-level acls (default try)
    assert (b.symlinks, b.acls, b.readers_managed) == ("try-secure", "try", True)
    d["acls"] = "off"
    cfg = config.parse(d, tmp_path / "x.yaml")
    assert [o.acls for o in cfg.outputs] == ["required", "off"] and cfg.storage_acls == "off"
    # the guide's file: defaults everywhere
    cfg = config.parse(yaml.safe_load(GUIDE), tmp_path / "x.yaml")
    assert (cfg.storage_symlinks, cfg.storage_acls) == ("try-secure", "try")
    assert (cfg.outputs[0].symlinks, cfg.outputs[0].acls, cfg.outputs[0].readers_managed) == ("try-secure", "try",
                                                                                              False)


def test_v2_directory_keys(tmp_path):
    d = copy.deepcopy(V2)
    d["storage"]["symlinks"] = "insecure"
    d["outputs"][0]["destination"].update({"symlinks": "secure", "acls": "off"})
    cfg = config.parse(d, tmp_path / "x.yaml")
    assert (cfg.storage_symlinks, cfg.storage_acls) == ("insecure", "try")
    k1, k2 = cfg.outputs
    assert (k1.symlinks, k1.acls, k1.readers_managed) == ("secure", "off", True)
    assert (k2.symlinks, k2.acls, k2.readers_managed) == ("try-secure", "required", False)


@pytest.mark.parametrize("where, value, expected", [
    (("storage", "directory", "symlinks"), "secur",
     "storage.directory.symlinks: 'secur' is not one of secure, try-secure, insecure; did you mean 'secure'?"),
    (("destinations", 0, "directory", "acls"), "requird",
     "destinations[0].directory.acls: 'requird' is not one of try, required, off; did you mean 'required'?"),
    (("destinations", 0, "directory", "symlinks"), "never",
     "destinations[0].directory.symlinks: 'never' is not one of secure, try-secure, insecure"),
])
def test_bad_directory_keys_name_key_and_fix(tmp_path, where, value, expected):
    d = yaml.safe_load(GUIDE)
    d["storage"] = {"directory": {"path": "/var/lib/teleport/bot"}}
    d["destinations"][0]["directory"] = {"path": "/opt/machine-id"}
    cur = d
    for k in where[:-1]:
        cur = cur[k]
    cur[where[-1]] = value
    with pytest.raises(ConfigError) as ei:
        config.parse(d, tmp_path / "x.yaml")
    assert str(ei.value) == expected


def test_unreachable_ca_path_is_a_config_error_not_a_traceback(tmp_path, monkeypatch):
    # the agent's user may not search a directory on the way to onboarding.ca_path (a mode drift on the host):
    # `status` must still answer with one line, so the role can tell "unreadable config" from "no identity"
    d = yaml.safe_load(GUIDE)
    d["onboarding"]["ca_path"] = str(tmp_path / "locked" / "proxy-ca.pem")
    real_is_file = Path.is_file

    def is_file(self):
        if self.parent.name == "locked":
            raise PermissionError(13, "Permission denied", str(self))
        return real_is_file(self)

    monkeypatch.setattr(Path, "is_file", is_file)
    with pytest.raises(ConfigError, match=r"onboarding.ca_path: cannot reach .*proxy-ca.pem \(Permission denied\); "
                                          r"make it and its directories readable"):
        config.parse(d)
