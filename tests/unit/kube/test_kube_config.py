# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Kubeconfig resolution like kubectl: files, merge order, contexts, relative paths, inline data, exec plugins."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys

import pytest
import yaml

from ansible_collections.lanyard.machine_id.plugins.module_utils import _kube_config as kcfg
from ansible_collections.lanyard.machine_id.plugins.module_utils._errors import LanyardError

PARAMS = {k: (v.get("default")) for k, v in kcfg.AUTH_ARG_SPEC.items()}


def params(**kw):
    p = dict(PARAMS)
    p.update(kw)
    return p


def write(path, doc):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc))
    return path


def kubeconfig(clusters=(), users=(), contexts=(), current=None):
    doc = {"apiVersion": "v1", "kind": "Config",
           "clusters": [{"name": n, "cluster": c} for n, c in clusters],
           "users": [{"name": n, "user": u} for n, u in users],
           "contexts": [{"name": n, "context": c} for n, c in contexts]}
    if current:
        doc["current-context"] = current
    return doc


def b64(text):
    return base64.b64encode(text.encode()).decode()


def test_current_context_and_relative_paths_resolve_against_the_kubeconfig(tmp_path):
    kc = write(tmp_path / "conf" / "kubeconfig.yaml", kubeconfig(
        clusters=[("c1", {"server": "https://10.1.2.3:6443/", "certificate-authority": "ca.crt",
                          "tls-server-name": "kube-teleport-proxy-alpn.teleport.cluster.local"})],
        users=[("u1", {"client-certificate": "../certs/u.crt", "client-key": "/abs/u.key"})],
        contexts=[("ctx1", {"cluster": "c1", "user": "u1"})], current="ctx1"))
    conn = kcfg.resolve(params(kubeconfig=str(kc)), env={}, home=str(tmp_path))
    assert conn.server == "https://10.1.2.3:6443"
    assert conn.ca_file == str(tmp_path / "conf" / "ca.crt")
    assert conn.client_cert_file == str(tmp_path / "certs" / "u.crt")
    assert conn.client_key_file == "/abs/u.key"
    assert conn.tls_server_name == "kube-teleport-proxy-alpn.teleport.cluster.local"
    assert conn.verify is True
    assert conn.cluster_name == "c1" and conn.context == "ctx1"
    assert "c1" in conn.label and "https://10.1.2.3:6443" in conn.label


def test_explicit_context_wins_over_current_context(tmp_path):
    kc = write(tmp_path / "k", kubeconfig(
        clusters=[("a", {"server": "https://a:1"}), ("b", {"server": "https://b:2"})],
        contexts=[("ca", {"cluster": "a"}), ("cb", {"cluster": "b"})], current="ca"))
    assert kcfg.resolve(params(kubeconfig=str(kc)), env={}, home="/nonexistent").server == "https://a:1"
    assert kcfg.resolve(params(kubeconfig=str(kc), context="cb"), env={}, home="/nonexistent").server == "https://b:2"


def test_unknown_context_names_the_choices(tmp_path):
    kc = write(tmp_path / "k", kubeconfig(clusters=[("a", {"server": "https://a:1"})],
                                          contexts=[("ca", {"cluster": "a"}), ("cz", {"cluster": "a"})]))
    with pytest.raises(LanyardError) as err:
        kcfg.resolve(params(kubeconfig=str(kc), context="nope"), env={}, home="/x")
    assert "context 'nope'" in err.value.msg and "ca, cz" in err.value.msg and "Fix" in err.value.msg
    with pytest.raises(LanyardError) as err:
        kcfg.resolve(params(kubeconfig=str(kc)), env={}, home="/x")
    assert "no current-context" in err.value.msg


def test_kubeconfig_env_merges_first_file_wins_and_paths_follow_the_defining_file(tmp_path):
    first = write(tmp_path / "one" / "config", kubeconfig(
        clusters=[("shared", {"server": "https://first:1", "certificate-authority": "ca1.crt"})],
        contexts=[("ctx", {"cluster": "shared", "user": "u2"})], current="ctx"))
    second = write(tmp_path / "two" / "config", kubeconfig(
        clusters=[("shared", {"server": "https://second:2"})],
        users=[("u2", {"tokenFile": "token"})], current="other"))
    (tmp_path / "two" / "token").write_text("s3cr3t-token\n")
    env = {"KUBECONFIG": os.pathsep.join([str(first), str(tmp_path / "missing"), str(second)])}
    conn = kcfg.resolve(params(), env=env, home="/nonexistent")
    assert conn.server == "https://first:1"
    assert conn.ca_file == str(tmp_path / "one" / "ca1.crt")
    assert conn.token == "s3cr3t-token"
    assert "s3cr3t-token" in conn.secrets


def test_option_beats_env_and_env_beats_home(tmp_path):
    home = tmp_path / "home"
    write(home / ".kube" / "config", kubeconfig(clusters=[("h", {"server": "https://home:1"})],
                                                contexts=[("h", {"cluster": "h"})], current="h"))
    envfile = write(tmp_path / "env", kubeconfig(clusters=[("e", {"server": "https://env:1"})],
                                                 contexts=[("e", {"cluster": "e"})], current="e"))
    opt = write(tmp_path / "opt", kubeconfig(clusters=[("o", {"server": "https://opt:1"})],
                                             contexts=[("o", {"cluster": "o"})], current="o"))
    assert kcfg.resolve(params(), env={}, home=str(home)).server == "https://home:1"
    assert kcfg.resolve(params(), env={"KUBECONFIG": str(envfile)}, home=str(home)).server == "https://env:1"
    assert kcfg.resolve(params(kubeconfig=str(opt)), env={"KUBECONFIG": str(envfile)},
                        home=str(home)).server == "https://opt:1"


def test_inline_data_is_decoded_and_secrets_collected(tmp_path):
    kc = write(tmp_path / "k", kubeconfig(
        clusters=[("c", {"server": "https://c:1", "certificate-authority-data": b64("CA PEM")})],
        users=[("u", {"client-certificate-data": b64("CERT PEM"), "client-key-data": b64("KEY PEM"),
                      "token": "tok-123"})],
        contexts=[("x", {"cluster": "c", "user": "u"})], current="x"))
    conn = kcfg.resolve(params(kubeconfig=str(kc)), env={}, home="/x")
    assert conn.ca_data == b"CA PEM" and conn.client_cert_data == b"CERT PEM" and conn.client_key_data == b"KEY PEM"
    assert {"KEY PEM", b64("KEY PEM"), "tok-123"} <= set(conn.secrets)
    assert "CERT PEM" not in conn.secrets


def test_insecure_skip_and_overrides(tmp_path):
    kc = write(tmp_path / "k", kubeconfig(
        clusters=[("c", {"server": "https://c:1", "insecure-skip-tls-verify": True, "proxy-url": "http://p:3128"})],
        contexts=[("x", {"cluster": "c"})], current="x"))
    conn = kcfg.resolve(params(kubeconfig=str(kc)), env={}, home="/x")
    assert conn.verify is False and conn.proxy_url == "http://p:3128"
    kc2 = write(tmp_path / "k2", kubeconfig(
        clusters=[("c", {"server": "https://c:1", "certificate-authority-data": b64("X")})],
        contexts=[("x", {"cluster": "c"})], current="x"))
    conn = kcfg.resolve(params(kubeconfig=str(kc2), ca_cert="/etc/my-ca.pem"), env={}, home="/x")
    assert conn.ca_file == "/etc/my-ca.pem" and conn.ca_data is None and conn.verify is True
    conn = kcfg.resolve(params(kubeconfig=str(kc2), validate_certs=False), env={}, home="/x")
    assert conn.verify is False


def test_host_mode_ignores_kubeconfig_and_hides_the_api_key(tmp_path):
    envfile = write(tmp_path / "env", kubeconfig(clusters=[("e", {"server": "https://env:1"})],
                                                 contexts=[("e", {"cluster": "e"})], current="e"))
    conn = kcfg.resolve(params(host="203.0.113.5:6443", api_key=" abc.def \n", ca_cert="/ca.pem"),
                        env={"KUBECONFIG": str(envfile)}, home="/x")
    assert conn.server == "https://203.0.113.5:6443"
    assert conn.token == "abc.def" and conn.secrets == ["abc.def"]
    assert conn.ca_file == "/ca.pem"
    conn = kcfg.resolve(params(host="https://h", client_cert="/c.crt", client_key="/c.key"), env={}, home="/x")
    assert (conn.client_cert_file, conn.client_key_file, conn.token) == ("/c.crt", "/c.key", None)


def test_in_cluster_service_account(tmp_path):
    sa = tmp_path / "sa"
    sa.mkdir()
    (sa / "token").write_text("sa-token")
    (sa / "ca.crt").write_text("CA")
    env = {"KUBERNETES_SERVICE_HOST": "fd00::1", "KUBERNETES_SERVICE_PORT": "443"}
    conn = kcfg.resolve(params(), env=env, home=str(tmp_path / "nohome"), sa_dir=str(sa))
    assert conn.server == "https://[fd00::1]:443"
    assert conn.token == "sa-token" and conn.ca_file == str(sa / "ca.crt") and "sa-token" in conn.secrets


def test_nothing_found_is_one_clear_error(tmp_path):
    with pytest.raises(LanyardError) as err:
        kcfg.resolve(params(), env={}, home=str(tmp_path), sa_dir=str(tmp_path / "none"))
    assert "no Kubernetes connection" in err.value.msg and "Fix" in err.value.msg
    with pytest.raises(LanyardError) as err:
        kcfg.resolve(params(), env={"KUBECONFIG": str(tmp_path / "gone")}, home=str(tmp_path))
    assert "KUBECONFIG" in err.value.msg


@pytest.mark.parametrize("content, expected", [
    ("clusters: [", "not valid YAML"),
    ("- a\n- b\n", "not a mapping"),
])
def test_broken_kubeconfig_reports_file_not_content(tmp_path, content, expected):
    kc = tmp_path / "k"
    kc.write_text(content)
    with pytest.raises(LanyardError) as err:
        kcfg.resolve(params(kubeconfig=str(kc)), env={}, home="/x")
    assert expected in err.value.msg and str(kc) in err.value.msg


def test_auth_provider_and_interactive_exec_are_refused(tmp_path):
    kc = write(tmp_path / "k", kubeconfig(
        clusters=[("c", {"server": "https://c:1"})],
        users=[("gcp", {"auth-provider": {"name": "gcp"}}),
               ("tty", {"exec": {"command": "x", "apiVersion": kcfg.EXEC_API_VERSIONS[0],
                                 "interactiveMode": "Always"}})],
        contexts=[("a", {"cluster": "c", "user": "gcp"}), ("b", {"cluster": "c", "user": "tty"})]))
    with pytest.raises(LanyardError, match="auth-provider 'gcp'"):
        kcfg.resolve(params(kubeconfig=str(kc), context="a"), env={}, home="/x")
    with pytest.raises(LanyardError, match="interactive"):
        kcfg.resolve(params(kubeconfig=str(kc), context="b"), env={}, home="/x")


def _subprocess_runner(argv, env):
    proc = subprocess.run(argv, capture_output=True, text=True, env=dict(os.environ, **env), check=False)
    return proc.returncode, proc.stdout, proc.stderr


def _plugin(tmp_path, body):
    script = tmp_path / "bin" / "cred-plugin"
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text("#!%s\n%s" % (sys.executable, body))
    script.chmod(0o755)
    return script


def test_exec_plugin_token_relative_command_env_and_cluster_info(tmp_path):
    _plugin(tmp_path, """
import json, os, sys
info = json.loads(os.environ["KUBERNETES_EXEC_INFO"])
assert info["spec"]["interactive"] is False
assert info["spec"]["cluster"]["tls-server-name"] == "sni.example"
assert os.environ["PLUGIN_MODE"] == "ci" and sys.argv[1:] == ["kube", "credentials"]
print(json.dumps({"apiVersion": info["apiVersion"], "kind": "ExecCredential",
                  "status": {"token": "exec-token-42"}}))
""")
    kc = write(tmp_path / "k", kubeconfig(
        clusters=[("c", {"server": "https://c:1", "tls-server-name": "sni.example"})],
        users=[("bot", {"exec": {"command": "./bin/cred-plugin", "args": ["kube", "credentials"],
                                 "apiVersion": "client.authentication.k8s.io/v1beta1",
                                 "env": [{"name": "PLUGIN_MODE", "value": "ci"}], "provideClusterInfo": True}})],
        contexts=[("x", {"cluster": "c", "user": "bot"})], current="x"))
    conn = kcfg.resolve(params(kubeconfig=str(kc)), env={}, home="/x")
    assert conn.exec_plugin.command == str(tmp_path / "bin" / "cred-plugin")
    kcfg.run_exec_plugin(conn, _subprocess_runner)
    assert conn.token == "exec-token-42" and "exec-token-42" in conn.secrets


def test_exec_plugin_client_certificate_and_failures(tmp_path):
    _plugin(tmp_path, """
import json, sys
if len(sys.argv) > 1:
    sys.stderr.write("identity expired, run tbot again\\n"); sys.exit(3)
print(json.dumps({"kind": "ExecCredential", "status": {"clientCertificateData": "CERT", "clientKeyData": "KEY"}}))
""")
    kc = write(tmp_path / "k", kubeconfig(
        clusters=[("c", {"server": "https://c:1"})],
        users=[("ok", {"exec": {"command": str(tmp_path / "bin" / "cred-plugin")}}),
               ("bad", {"exec": {"command": str(tmp_path / "bin" / "cred-plugin"), "args": ["fail"]}}),
               ("gone", {"exec": {"command": str(tmp_path / "nope"), "installHint": "install tbot"}})],
        contexts=[("ok", {"cluster": "c", "user": "ok"}), ("bad", {"cluster": "c", "user": "bad"}),
                  ("gone", {"cluster": "c", "user": "gone"})]))
    conn = kcfg.run_exec_plugin(kcfg.resolve(params(kubeconfig=str(kc), context="ok"), env={}, home="/x"),
                                _subprocess_runner)
    assert conn.client_cert_data == b"CERT" and conn.client_key_data == b"KEY" and "KEY" in conn.secrets
    with pytest.raises(LanyardError) as err:
        kcfg.run_exec_plugin(kcfg.resolve(params(kubeconfig=str(kc), context="bad"), env={}, home="/x"),
                             _subprocess_runner)
    assert "exit 3" in err.value.msg and "identity expired" in err.value.msg and "user 'bad'" in err.value.msg
    with pytest.raises(LanyardError) as err:
        kcfg.run_exec_plugin(kcfg.resolve(params(kubeconfig=str(kc), context="gone"), env={}, home="/x"),
                             _subprocess_runner)
    assert "could not be started" in err.value.msg and "install tbot" in err.value.msg


def test_exec_info_has_ca_data_from_file(tmp_path):
    ca = tmp_path / "ca.crt"
    ca.write_text("PEM")
    conn = kcfg.Connection("https://c:1", "test")
    conn.ca_file = str(ca)
    plugin = kcfg.ExecPlugin("u", "x", [], {}, kcfg.EXEC_API_VERSIONS[0], True, None, "Never")
    info = kcfg.exec_info(plugin, conn)
    assert info["spec"]["cluster"]["certificate-authority-data"] == b64("PEM")
    assert json.loads(json.dumps(info)) == info


def test_exec_plugin_error_output_has_opaque_strings_redacted(tmp_path):
    leaked = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJib3QifQ.c2lnbmF0dXJlLXNlY3JldA"
    _plugin(tmp_path, "import sys\nsys.stderr.write('rejected token %s for /var/lib/teleport/bot\\n')\nsys.exit(1)\n"
            % leaked)
    kc = write(tmp_path / "k", kubeconfig(
        clusters=[("c", {"server": "https://c:1"})],
        users=[("u", {"exec": {"command": str(tmp_path / "bin" / "cred-plugin")}})],
        contexts=[("x", {"cluster": "c", "user": "u"})], current="x"))
    with pytest.raises(LanyardError) as err:
        kcfg.run_exec_plugin(kcfg.resolve(params(kubeconfig=str(kc)), env={}, home="/x"), _subprocess_runner)
    assert leaked not in err.value.msg and "<redacted>" in err.value.msg and "/var/lib/teleport/bot" in err.value.msg


# -- K8S_AUTH_* environment fallbacks, proxy / no_proxy, kubeconfig as a dict -----------------------------------

def _simple(tmp_path, name, server):
    return write(tmp_path / name, kubeconfig(clusters=[(name, {"server": server})],
                                             contexts=[(name, {"cluster": name}), ("other", {"cluster": name})],
                                             current=name))


def test_k8s_auth_env_fills_only_what_the_task_leaves_unset(tmp_path):
    a, b = _simple(tmp_path, "a", "https://a:1"), _simple(tmp_path, "b", "https://b:1")
    env = {"K8S_AUTH_KUBECONFIG": str(a), "K8S_AUTH_CONTEXT": "other", "K8S_AUTH_SSL_CA_CERT": "/env-ca.pem",
           "K8S_AUTH_VERIFY_SSL": "no", "K8S_AUTH_PROXY": "http://user:pw-secret@proxy:3128",
           "K8S_AUTH_NO_PROXY": "b, .example.com"}
    conn = kcfg.resolve(params(), env=env, home="/x")
    assert (conn.server, conn.context, conn.ca_file, conn.verify) == ("https://a:1", "other", "/env-ca.pem", False)
    assert conn.proxy_url == "http://user:pw-secret@proxy:3128" and "pw-secret" in conn.secrets
    assert conn.no_proxy == ["b", ".example.com"]
    conn = kcfg.resolve(params(kubeconfig=str(b), validate_certs=True, ca_cert="/opt.pem", proxy="http://p2:1"),
                        env=env, home="/x")
    assert (conn.server, conn.context, conn.ca_file, conn.verify, conn.proxy_url) == (
        "https://b:1", "other", "/opt.pem", True, "http://p2:1")


def test_k8s_auth_env_host_side_and_the_task_keeps_its_source(tmp_path):
    a = _simple(tmp_path, "a", "https://a:1")
    env = {"K8S_AUTH_HOST": "h:6443", "K8S_AUTH_API_KEY": " tok-env \n", "K8S_AUTH_CERT_FILE": "~/c.crt",
           "K8S_AUTH_KEY_FILE": "/c.key"}
    conn = kcfg.resolve(params(), env=env, home="/x")
    assert conn.server == "https://h:6443" and conn.token == "tok-env" and conn.secrets == ["tok-env"]
    assert conn.client_cert_file == os.path.expanduser("~/c.crt") and conn.source == "$K8S_AUTH_HOST"
    # A task with a kubeconfig does not read the host-side variables ...
    assert kcfg.resolve(params(kubeconfig=str(a)), env=env, home="/x").server == "https://a:1"
    # ... and a task with host does not read K8S_AUTH_KUBECONFIG; api_key may come from the environment.
    conn = kcfg.resolve(params(host="https://t:1"), env={"K8S_AUTH_KUBECONFIG": str(a), "K8S_AUTH_API_KEY": "k"},
                        home="/x")
    assert conn.server == "https://t:1" and conn.token == "k"


@pytest.mark.parametrize("p, env, words", [
    ({}, {"K8S_AUTH_HOST": "h", "K8S_AUTH_KUBECONFIG": "/k"}, ["$K8S_AUTH_HOST", "$K8S_AUTH_KUBECONFIG"]),
    ({}, {"K8S_AUTH_API_KEY": "t"}, ["$K8S_AUTH_API_KEY needs host"]),
    ({"api_key": "t"}, {}, ["option api_key needs host"]),
    ({"host": "h", "client_cert": "/c"}, {}, ["option client_cert is set but client_key is not"]),
    ({}, {"K8S_AUTH_HOST": "h", "K8S_AUTH_KEY_FILE": "/k"}, ["$K8S_AUTH_KEY_FILE is set but client_cert"]),
    ({}, {"K8S_AUTH_VERIFY_SSL": "maybe", "K8S_AUTH_HOST": "h"}, ["$K8S_AUTH_VERIFY_SSL is 'maybe'", "boolean"]),
    ({"host": "h", "no_proxy": "10.0.0.0/33"}, {}, ["no_proxy entry '10.0.0.0/33'"]),
    ({"kubeconfig": ["a"]}, {}, ["option kubeconfig is a list"]),
])
def test_wrong_combinations_are_one_clear_line(p, env, words):
    with pytest.raises(LanyardError) as err:
        kcfg.resolve(params(**p), env=env, home="/x")
    msg = str(err.value)
    assert "\n" not in msg and all(w in msg for w in words), msg
    assert "tok" not in msg


def test_kubeconfig_option_lists_files_like_kubeconfig_env(tmp_path):
    a, b = _simple(tmp_path, "a", "https://a:1"), _simple(tmp_path, "b", "https://b:1")
    conn = kcfg.resolve(params(kubeconfig="%s:%s" % (a, b), context="b"), env={}, home="/x")
    assert conn.server == "https://b:1"
    with pytest.raises(LanyardError, match="cannot read kubeconfig"):
        kcfg.resolve(params(kubeconfig="%s:%s" % (a, tmp_path / "missing")), env={}, home="/x")


def test_kubeconfig_as_a_dict(tmp_path):
    doc = kubeconfig(clusters=[("m", {"server": "https://mem:1", "certificate-authority-data": b64("CA")})],
                     users=[("u", {"client-certificate-data": b64("CERT"), "client-key-data": b64("KEY"),
                                   "token": "t-mem"})],
                     contexts=[("m", {"cluster": "m", "user": "u"}), ("n", {"cluster": "m"})], current="m")
    conn = kcfg.resolve(params(kubeconfig=doc), env={"K8S_AUTH_KUBECONFIG": "/ignored"}, home="/x")
    assert (conn.server, conn.ca_data, conn.client_key_data, conn.token) == ("https://mem:1", b"CA", b"KEY", "t-mem")
    assert {"KEY", b64("KEY"), "t-mem"} <= set(conn.secrets)
    assert kcfg.resolve(params(kubeconfig=doc, context="n"), env={}, home="/x").token is None
    with pytest.raises(LanyardError, match=r"context 'zz' is not in kubeconfig \(dict\)"):
        kcfg.resolve(params(kubeconfig=doc, context="zz"), env={}, home="/x")


@pytest.mark.parametrize("host, entries, bypass", [
    ("127.0.0.1", ["127.0.0.0/8"], True),
    ("127.0.0.1", ["127.0.0.1"], True),
    ("10.1.2.3", ["127.0.0.0/8", "localhost"], False),
    ("api.example.com", [".example.com"], True),
    ("api.example.com", ["example.com"], True),
    ("example.com", [".example.com"], True),
    ("badexample.com", ["example.com"], False),
    ("anything", ["*"], True),
    ("fd00::1", ["fd00::/8"], True),
    ("[fd00::1]", ["fd00::1"], True),
])
def test_no_proxy_matching(host, entries, bypass):
    assert kcfg.bypasses_proxy(host, kcfg.parse_no_proxy(",".join(entries))) is bypass
