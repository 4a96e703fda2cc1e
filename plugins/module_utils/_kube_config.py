# -*- coding: utf-8 -*-
# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""PRIVATE to this collection: where to reach the Kubernetes API and how to authenticate, resolved like kubectl.

Sources, in order (the first that applies wins):

1. ``host`` (+ ``api_key`` / ``client_cert`` + ``client_key`` / ``ca_cert``): explicit options, no kubeconfig read.
2. A kubeconfig: the ``kubeconfig`` option (a path, a list of paths separated like ``$KUBECONFIG``, or the
   kubeconfig itself as a dict), else every file in ``$KUBECONFIG`` (merged the kubectl way: the first file
   that defines a name or the current context wins), else ``~/.kube/config``.
3. The in-cluster service account (``KUBERNETES_SERVICE_HOST`` + the mounted token and CA).

Every connection option that a task leaves unset is read from its ``K8S_AUTH_*`` environment variable, with
the names kubernetes.core uses (:data:`ENV_FALLBACKS`); a task that chooses its source (``host`` ... or
``kubeconfig``/``context``) is not mixed with the other source's variables.

:func:`resolve` turns module parameters into a :class:`Connection`: plain data, with inline certificate
data still in memory (the client writes it to 0600 temporary files only for the request and deletes them).
Every secret it meets (tokens, passwords, private keys) is listed in ``Connection.secrets`` so that the
module can add them to ``no_log_values``. Raises only :class:`LanyardError`.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import base64
import ipaddress
import json
import os
import re

from ansible.module_utils.parsing.convert_bool import boolean
from ansible.module_utils.six.moves.urllib.parse import urlparse

from ansible_collections.lanyard.machine_id.plugins.module_utils._errors import LanyardError

try:
    import yaml
    HAS_YAML = True
except ImportError:  # pragma: no cover - JSON kubeconfigs still work
    HAS_YAML = False

# Long opaque strings (tokens, JWTs, base64 keys) are cut out of a plugin's error output before it is shown.
_OPAQUE = re.compile(r"[A-Za-z0-9_\-.=+]{32,}")
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
EXEC_API_VERSIONS = ("client.authentication.k8s.io/v1", "client.authentication.k8s.io/v1beta1")

# The shared connection options (documented in plugins/doc_fragments/kube_auth.py; keep them equal).
AUTH_ARG_SPEC = dict(
    kubeconfig=dict(type="raw"),
    context=dict(type="str"),
    host=dict(type="str"),
    api_key=dict(type="str", no_log=True),
    client_cert=dict(type="path"),
    client_key=dict(type="path", no_log=False),
    ca_cert=dict(type="path"),
    validate_certs=dict(type="bool"),
    proxy=dict(type="str"),
    no_proxy=dict(type="str"),
    request_timeout=dict(type="int", default=30),
)
AUTH_MUTUALLY_EXCLUSIVE = [("host", "kubeconfig"), ("host", "context")]
# An option the task leaves unset is read from this environment variable (kubernetes.core's names).
ENV_FALLBACKS = dict(
    kubeconfig="K8S_AUTH_KUBECONFIG",
    context="K8S_AUTH_CONTEXT",
    host="K8S_AUTH_HOST",
    api_key="K8S_AUTH_API_KEY",
    validate_certs="K8S_AUTH_VERIFY_SSL",
    ca_cert="K8S_AUTH_SSL_CA_CERT",
    client_cert="K8S_AUTH_CERT_FILE",
    client_key="K8S_AUTH_KEY_FILE",
    proxy="K8S_AUTH_PROXY",
    no_proxy="K8S_AUTH_NO_PROXY",
)
HOST_OPTIONS = ("host", "api_key", "client_cert", "client_key")
KUBECONFIG_OPTIONS = ("kubeconfig", "context")
PATH_OPTIONS = ("client_cert", "client_key", "ca_cert")


def auth_argument_spec():
    """A fresh copy of the connection options, to merge into a module's argument spec."""
    return dict((k, dict(v)) for k, v in AUTH_ARG_SPEC.items())


class ExecPlugin(object):
    """A kubeconfig ``user.exec`` entry, resolved (relative command paths made absolute)."""

    def __init__(self, user, command, args, env, api_version, provide_cluster_info, install_hint,
                 interactive_mode):
        self.user = user
        self.command = command
        self.args = list(args or [])
        self.env = dict(env or {})
        self.api_version = api_version
        self.provide_cluster_info = provide_cluster_info
        self.install_hint = install_hint
        self.interactive_mode = interactive_mode


class Connection(object):
    """Everything needed to open HTTPS connections to one API server. No I/O."""

    def __init__(self, server, source, cluster_name=None, context=None):
        self.server = server.rstrip("/")
        self.source = source              # human text: where this came from (no secrets)
        self.cluster_name = cluster_name  # kubeconfig cluster name, when known
        self.context = context
        self.verify = True
        self.ca_file = None
        self.ca_data = None               # PEM bytes
        self.tls_server_name = None
        self.proxy_url = None
        self.client_cert_file = None
        self.client_key_file = None
        self.client_cert_data = None      # PEM bytes
        self.client_key_data = None       # PEM bytes (secret)
        self.token = None                 # secret
        self.username = None
        self.password = None              # secret
        self.impersonate_user = None
        self.impersonate_groups = []
        self.exec_plugin = None
        self.no_proxy = []                # entries of the no_proxy option (hosts, domains, IPs, CIDRs)
        self.secrets = []

    @property
    def label(self):
        """How messages name the cluster: ``cluster 'name' (https://host:port)``."""
        if self.cluster_name:
            return "cluster '%s' (%s)" % (self.cluster_name, self.server)
        return "the cluster at %s" % self.server

    def add_secret(self, value):
        if value:
            text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
            text = text.strip()
            if text and text not in self.secrets:
                self.secrets.append(text)


# -- helpers -------------------------------------------------------------------------------------------

def _load_document(path):
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except (IOError, OSError) as exc:
        raise LanyardError("cannot read kubeconfig %s: %s. Fix the path (option kubeconfig or $KUBECONFIG)."
                           % (path, exc.strerror or exc))
    text = raw.decode("utf-8", "replace")
    try:
        if HAS_YAML:
            doc = yaml.safe_load(text)
        else:
            doc = json.loads(text)
    except Exception as exc:  # yaml.YAMLError / ValueError: report the file, not the content
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise LanyardError("kubeconfig %s is not valid YAML (%s). Fix the file or point kubeconfig at another one."
                           % (path, first))
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise LanyardError("kubeconfig %s is not a mapping (kind: Config expected). Fix the file." % path)
    return doc


def _named_entries(doc, section, path):
    out = []
    for item in doc.get(section) or []:
        if not isinstance(item, dict) or not item.get("name"):
            raise LanyardError("kubeconfig %s: an entry under %s has no name. Fix the file." % (path, section))
        out.append(item)
    return out


def _decode_b64(value, what, where):
    try:
        return base64.b64decode(value.strip() if isinstance(value, str) else value, validate=False)
    except (ValueError, TypeError):
        raise LanyardError("%s: %s is not valid base64. Fix the value (base64 of the PEM text)." % (where, what))


def _resolve_path(value, base_dir):
    value = os.path.expanduser(str(value))
    if os.path.isabs(value) or not base_dir:
        return value
    return os.path.normpath(os.path.join(base_dir, value))


def kubeconfig_files(param, env, home):
    """The kubeconfig files kubectl would read: the option, else $KUBECONFIG (existing files), else ~/.kube/config."""
    if param:
        return [param]
    listed = env.get("KUBECONFIG")
    if listed:
        files = [p for p in listed.split(os.pathsep) if p]
        found = [p for p in files if os.path.exists(os.path.expanduser(p))]
        if not found:
            raise LanyardError("none of the files in $KUBECONFIG exist (%s). Fix $KUBECONFIG or set kubeconfig."
                               % listed)
        return [os.path.expanduser(p) for p in found]
    if home:
        default = os.path.join(home, ".kube", "config")
        if os.path.exists(default):
            return [default]
    return []


def merge_kubeconfigs(paths, docs=None):
    """Merge files like kubectl: per name, the first file wins; so does the first current-context.

    Each entry comes back as ``(body, base_dir, path)`` so relative file references resolve against the file
    that defined the entry. ``docs`` (``[(label, dict)]``) are kubeconfigs already in memory; relative paths in
    them stay relative to the module's working directory.
    """
    merged = {"clusters": {}, "users": {}, "contexts": {}, "current-context": None}
    bodies = {"clusters": "cluster", "users": "user", "contexts": "context"}
    sources = [(path, _load_document(path), os.path.dirname(os.path.abspath(path))) for path in paths]
    sources += [(label, doc, None) for label, doc in (docs or [])]
    for path, doc, base_dir in sources:
        for section, body_key in bodies.items():
            for item in _named_entries(doc, section, path):
                merged[section].setdefault(item["name"], (item.get(body_key) or {}, base_dir, path))
        if not merged["current-context"] and doc.get("current-context"):
            merged["current-context"] = doc["current-context"]
    return merged


def _apply_cluster(conn, cluster, base_dir, where):
    ca_data = cluster.get("certificate-authority-data")
    if ca_data:
        conn.ca_data = _decode_b64(ca_data, "certificate-authority-data", where)
    elif cluster.get("certificate-authority"):
        conn.ca_file = _resolve_path(cluster["certificate-authority"], base_dir)
    if cluster.get("insecure-skip-tls-verify"):
        conn.verify = False
    if cluster.get("tls-server-name"):
        conn.tls_server_name = cluster["tls-server-name"]
    if cluster.get("proxy-url"):
        conn.proxy_url = cluster["proxy-url"]


def _apply_user(conn, user, base_dir, where, user_name):
    if user.get("client-certificate-data"):
        conn.client_cert_data = _decode_b64(user["client-certificate-data"], "client-certificate-data", where)
    elif user.get("client-certificate"):
        conn.client_cert_file = _resolve_path(user["client-certificate"], base_dir)
    if user.get("client-key-data"):
        conn.client_key_data = _decode_b64(user["client-key-data"], "client-key-data", where)
        conn.add_secret(conn.client_key_data)
        conn.add_secret(user["client-key-data"])
    elif user.get("client-key"):
        conn.client_key_file = _resolve_path(user["client-key"], base_dir)
    if user.get("token"):
        conn.token = str(user["token"]).strip()
        conn.add_secret(conn.token)
    elif user.get("tokenFile"):
        conn.token = _read_secret_file(_resolve_path(user["tokenFile"], base_dir), "tokenFile of user '%s'" % user_name)
        conn.add_secret(conn.token)
    if user.get("username"):
        conn.username = str(user["username"])
        conn.password = str(user.get("password") or "")
        conn.add_secret(conn.password)
    if user.get("as"):
        conn.impersonate_user = str(user["as"])
    if user.get("as-groups"):
        conn.impersonate_groups = [str(g) for g in user["as-groups"]]
    if user.get("auth-provider"):
        name = (user["auth-provider"] or {}).get("name", "?")
        raise LanyardError("%s: user '%s' uses the removed auth-provider '%s', which this module does not support. "
                           "Fix: switch the kubeconfig user to an exec credential plugin, a token or a client "
                           "certificate." % (where, user_name, name))
    if user.get("exec"):
        conn.exec_plugin = _exec_plugin(user["exec"], base_dir, where, user_name)
    if (conn.client_cert_data or conn.client_cert_file) and not (conn.client_key_data or conn.client_key_file):
        raise LanyardError("%s: user '%s' has a client certificate but no client key. Fix: add client-key or "
                           "client-key-data." % (where, user_name))


def _exec_plugin(spec, base_dir, where, user_name):
    if not isinstance(spec, dict) or not spec.get("command"):
        raise LanyardError("%s: user '%s' has an exec entry without a command. Fix the kubeconfig." % (where, user_name))
    api_version = spec.get("apiVersion") or EXEC_API_VERSIONS[0]
    if api_version not in EXEC_API_VERSIONS:
        raise LanyardError("%s: user '%s' exec apiVersion '%s' is not supported (use one of %s). Fix the kubeconfig."
                           % (where, user_name, api_version, ", ".join(EXEC_API_VERSIONS)))
    command = str(spec["command"])
    # kubectl resolves a command given as a relative path (it has a separator) against the kubeconfig's directory.
    if os.sep in command and not os.path.isabs(command):
        command = _resolve_path(command, base_dir)
    env = {}
    for item in spec.get("env") or []:
        if isinstance(item, dict) and item.get("name"):
            env[str(item["name"])] = str(item.get("value", ""))
    mode = spec.get("interactiveMode") or "IfAvailable"
    if mode == "Always":
        raise LanyardError("%s: user '%s' exec plugin '%s' needs an interactive terminal (interactiveMode: Always), "
                           "which a module does not have. Fix: use a non-interactive credential."
                           % (where, user_name, command))
    return ExecPlugin(user_name, command, spec.get("args"), env, api_version,
                      bool(spec.get("provideClusterInfo")), spec.get("installHint"), mode)


def _read_secret_file(path, what):
    try:
        with open(path, "r") as fh:
            return fh.read().strip()
    except (IOError, OSError) as exc:
        raise LanyardError("cannot read %s at %s: %s. Fix the path or the file's permissions."
                           % (what, path, exc.strerror or exc))


def _normalise_host(host):
    host = host.strip()
    if "://" not in host:
        host = "https://" + host
    return host


# -- the three sources ----------------------------------------------------------------------------------

def from_kubeconfig(paths, context_name=None, doc=None):
    """A connection from kubeconfig files, or from one kubeconfig given as a dict (``doc``, ``paths`` empty)."""
    if doc is not None:
        if not isinstance(doc, dict):
            raise LanyardError("option kubeconfig is a %s; give a path or the kubeconfig as a dict. Fix the task."
                               % type(doc).__name__)
        merged = merge_kubeconfigs([], docs=[("(dict)", doc)])
        where = "kubeconfig (dict)"
    else:
        merged = merge_kubeconfigs(paths)
        where = "kubeconfig %s" % os.pathsep.join(paths)
    name = context_name or merged["current-context"]
    if not name:
        raise LanyardError("%s has no current-context and no context was given. Fix: set context (one of: %s)."
                           % (where, ", ".join(sorted(merged["contexts"])) or "none defined"))
    if name not in merged["contexts"]:
        raise LanyardError("context '%s' is not in %s. Fix: set context to one of: %s."
                           % (name, where, ", ".join(sorted(merged["contexts"])) or "none defined"))
    ctx, dummy, ctx_path = merged["contexts"][name]
    cluster_name = ctx.get("cluster")
    if not cluster_name or cluster_name not in merged["clusters"]:
        raise LanyardError("context '%s' in %s names cluster '%s', which is not defined. Fix the kubeconfig."
                           % (name, ctx_path, cluster_name))
    cluster, cluster_dir, cluster_path = merged["clusters"][cluster_name]
    if not cluster.get("server"):
        raise LanyardError("cluster '%s' in %s has no server. Fix the kubeconfig." % (cluster_name, cluster_path))
    conn = Connection(cluster["server"], "context '%s' of %s" % (name, where), cluster_name, name)
    _apply_cluster(conn, cluster, cluster_dir, "kubeconfig %s" % cluster_path)
    user_name = ctx.get("user")
    if user_name:
        if user_name not in merged["users"]:
            raise LanyardError("context '%s' in %s names user '%s', which is not defined. Fix the kubeconfig."
                               % (name, ctx_path, user_name))
        user, user_dir, user_path = merged["users"][user_name]
        _apply_user(conn, user, user_dir, "kubeconfig %s" % user_path, user_name)
    return conn


def from_host(params, source="option host"):
    conn = Connection(_normalise_host(params["host"]), source)
    if params.get("api_key"):
        conn.token = params["api_key"].strip()
        conn.add_secret(conn.token)
    if params.get("client_cert"):
        conn.client_cert_file = params["client_cert"]
        conn.client_key_file = params["client_key"]
    return conn


def from_service_account(env, sa_dir=SERVICE_ACCOUNT_DIR):
    host, port = env.get("KUBERNETES_SERVICE_HOST"), env.get("KUBERNETES_SERVICE_PORT")
    token_path = os.path.join(sa_dir, "token")
    if not host or not port or not os.path.exists(token_path):
        return None
    if ":" in host and not host.startswith("["):
        host = "[%s]" % host
    conn = Connection("https://%s:%s" % (host, port), "in-cluster service account (%s)" % sa_dir, "in-cluster")
    conn.token = _read_secret_file(token_path, "the service account token")
    conn.add_secret(conn.token)
    ca = os.path.join(sa_dir, "ca.crt")
    if os.path.exists(ca):
        conn.ca_file = ca
    return conn


def _given(value):
    return value is not None and value != ""


def effective_options(params, env):
    """The connection options after the ``K8S_AUTH_*`` fallbacks, and where each one came from.

    Returns ``(options, sources)``; ``sources[name]`` is ``option NAME`` or ``$K8S_AUTH_...`` for messages.
    An option the task sets always wins. A task that chooses its source keeps it: with any of ``host``,
    ``api_key``, ``client_cert``, ``client_key`` set, ``K8S_AUTH_KUBECONFIG``/``K8S_AUTH_CONTEXT`` are not read;
    with ``kubeconfig`` or ``context`` set, the host-side variables are not read.
    """
    opts, sources = {}, {}
    task_host = any(_given(params.get(k)) for k in HOST_OPTIONS)
    task_kubeconfig = any(_given(params.get(k)) for k in KUBECONFIG_OPTIONS)
    for name in AUTH_ARG_SPEC:
        value = params.get(name)
        if _given(value):
            opts[name], sources[name] = value, "option %s" % name
            continue
        var = ENV_FALLBACKS.get(name)
        skip = (name in KUBECONFIG_OPTIONS and task_host) or (name in HOST_OPTIONS and task_kubeconfig)
        raw = env.get(var) if var and not skip else None
        if not _given(raw):
            opts[name] = value
            continue
        sources[name] = "$" + var
        if name == "validate_certs":
            try:
                raw = boolean(raw.strip(), strict=True)
            except TypeError:
                raise LanyardError("$%s is '%s', which is not a boolean. Fix: set it to true or false, or unset it."
                                   % (var, raw[:40]))
        elif name == "api_key":
            raw = raw.strip()
        elif name in PATH_OPTIONS or name == "kubeconfig":
            raw = os.path.expanduser(os.path.expandvars(raw.strip()))
        opts[name] = raw
    kubeconfig = opts.get("kubeconfig")
    if isinstance(kubeconfig, str) and sources.get("kubeconfig") == "option kubeconfig":
        opts["kubeconfig"] = os.path.expanduser(os.path.expandvars(kubeconfig))
    return opts, sources


def _check_combinations(opts, sources):
    def src(name):
        return sources.get(name, "option %s" % name)
    host_side = [k for k in HOST_OPTIONS if _given(opts.get(k))]
    kube_side = [k for k in KUBECONFIG_OPTIONS if _given(opts.get(k))]
    if _given(opts.get("host")) and kube_side:
        raise LanyardError("%s and %s both choose how to connect. Fix: use host (with api_key or a client "
                           "certificate) or a kubeconfig, not both; unset one of them."
                           % (src("host"), src(kube_side[0])))
    if host_side and not _given(opts.get("host")):
        raise LanyardError("%s needs host (option host or $K8S_AUTH_HOST). Fix: set host, or drop %s and use a "
                           "kubeconfig." % (src(host_side[0]), host_side[0]))
    cert, key = _given(opts.get("client_cert")), _given(opts.get("client_key"))
    if cert != key:
        have, missing = ("client_cert", "client_key") if cert else ("client_key", "client_cert")
        raise LanyardError("%s is set but %s is not. Fix: give both (options client_cert and client_key, or "
                           "$K8S_AUTH_CERT_FILE and $K8S_AUTH_KEY_FILE)." % (src(have), missing))


def parse_no_proxy(text):
    """``no_proxy`` text (comma separated) -> list of entries; refuses a CIDR that does not parse."""
    entries = []
    for item in (text or "").split(","):
        item = item.strip().lower()
        if not item:
            continue
        if "/" in item:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise LanyardError("no_proxy entry '%s' is not a valid CIDR. Fix the no_proxy option or "
                                   "$K8S_AUTH_NO_PROXY." % item)
        entries.append(item)
    return entries


def bypasses_proxy(host, entries):
    """True when ``host`` (a name or an IP) matches a no_proxy entry: ``*``, a host or domain (``.example.com``
    or ``example.com`` also match subdomains), an IP address or a CIDR."""
    host = (host or "").strip("[]").lower().rstrip(".")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    for entry in entries:
        if entry == "*":
            return True
        if "/" in entry:
            if address is not None and address in ipaddress.ip_network(entry, strict=False):
                return True
            continue
        name = entry.strip("[]")
        try:
            entry_address = ipaddress.ip_address(name)
        except ValueError:
            entry_address = None
        if entry_address is not None:
            if address == entry_address:
                return True
            continue
        name = name.lstrip("*").lstrip(".").rstrip(".")
        if name and (host == name or host.endswith("." + name)):
            return True
    return False


def resolve(params, env=None, home=None, sa_dir=SERVICE_ACCOUNT_DIR):
    """Module parameters (the AUTH_ARG_SPEC keys) and ``K8S_AUTH_*`` fallbacks -> :class:`Connection`."""
    env = os.environ if env is None else env
    home = os.path.expanduser("~") if home is None else home
    params, sources = effective_options(params, env)
    _check_combinations(params, sources)
    kubeconfig = params.get("kubeconfig")
    if kubeconfig is not None and not isinstance(kubeconfig, (str, dict)):
        raise LanyardError("option kubeconfig is a %s; give a path or the kubeconfig as a dict. Fix the task."
                           % type(kubeconfig).__name__)
    if params.get("host"):
        conn = from_host(params, sources["host"])
    elif isinstance(kubeconfig, dict):
        conn = from_kubeconfig([], params.get("context"), doc=kubeconfig)
    else:
        listed = [p for p in (kubeconfig or "").split(os.pathsep) if p]
        files = listed or kubeconfig_files(None, env, home)
        if files:
            conn = from_kubeconfig(files, params.get("context"))
        else:
            if params.get("context"):
                raise LanyardError("context '%s' was given but no kubeconfig was found (no kubeconfig option, no "
                                   "$KUBECONFIG, no ~/.kube/config). Fix: set kubeconfig." % params["context"])
            conn = from_service_account(env, sa_dir)
            if conn is None:
                raise LanyardError("no Kubernetes connection: no kubeconfig option, no $KUBECONFIG, no ~/.kube/config "
                                   "and not running in a pod. Fix: set kubeconfig (or host with api_key or "
                                   "client_cert/client_key).")
    # Overrides that apply to every source.
    if params.get("ca_cert"):
        conn.ca_file, conn.ca_data = params["ca_cert"], None
    if params.get("validate_certs") is False:
        conn.verify = False
    if params.get("proxy"):
        conn.proxy_url = params["proxy"].strip()
    if params.get("no_proxy"):
        conn.no_proxy = parse_no_proxy(params["no_proxy"])
    if conn.proxy_url:
        conn.add_secret(urlparse(conn.proxy_url).password)  # a proxy password is never shown
    return conn


def exec_info(plugin, conn):
    """The KUBERNETES_EXEC_INFO document handed to an exec credential plugin."""
    spec = {"interactive": False}
    if plugin.provide_cluster_info:
        cluster = {"server": conn.server, "insecure-skip-tls-verify": not conn.verify}
        if conn.ca_data:
            cluster["certificate-authority-data"] = base64.b64encode(conn.ca_data).decode("ascii")
        elif conn.ca_file:
            try:
                with open(conn.ca_file, "rb") as fh:
                    cluster["certificate-authority-data"] = base64.b64encode(fh.read()).decode("ascii")
            except (IOError, OSError):
                pass
        if conn.tls_server_name:
            cluster["tls-server-name"] = conn.tls_server_name
        if conn.proxy_url:
            cluster["proxy-url"] = conn.proxy_url
        spec["cluster"] = cluster
    return {"apiVersion": plugin.api_version, "kind": "ExecCredential", "spec": spec}


def run_exec_plugin(conn, run_command):
    """Run the kubeconfig's exec credential plugin once and put its credential into ``conn``.

    ``run_command(argv, environ_update) -> (rc, stdout, stderr)`` (AnsibleModule.run_command fits).
    """
    plugin = conn.exec_plugin
    if plugin is None:
        return conn
    env = dict(plugin.env)
    env["KUBERNETES_EXEC_INFO"] = json.dumps(exec_info(plugin, conn))
    what = "exec credential plugin '%s' of kubeconfig user '%s'" % (plugin.command, plugin.user)
    try:
        rc, out, err = run_command([plugin.command] + plugin.args, env)
    except (IOError, OSError) as exc:
        hint = (" " + plugin.install_hint.strip()) if plugin.install_hint else ""
        raise LanyardError("%s could not be started: %s. Fix: install it or fix the command path.%s"
                           % (what, exc.strerror or exc, hint))
    if rc != 0:
        last = [line for line in (err or "").strip().splitlines() if line.strip()]
        detail = _OPAQUE.sub("<redacted>", last[-1])[:300] if last else "no error output"
        hint = (" " + plugin.install_hint.strip()) if (rc == 127 and plugin.install_hint) else ""
        raise LanyardError("%s failed (exit %s): %s. Fix the plugin's configuration or credentials.%s"
                           % (what, rc, detail, hint))
    try:
        doc = json.loads(out)
        status = doc.get("status") or {}
    except (ValueError, AttributeError):
        raise LanyardError("%s printed no ExecCredential JSON. Fix: check the plugin and its apiVersion." % what)
    token = status.get("token")
    cert, key = status.get("clientCertificateData"), status.get("clientKeyData")
    if token:
        conn.token = token
        conn.add_secret(token)
    if cert and key:
        conn.client_cert_data, conn.client_key_data = cert.encode("utf-8"), key.encode("utf-8")
        conn.client_cert_file = conn.client_key_file = None
        conn.add_secret(key)
    elif cert or key:
        raise LanyardError("%s returned only one of clientCertificateData/clientKeyData. Fix the plugin." % what)
    if not token and not cert:
        raise LanyardError("%s returned neither a token nor a client certificate. Fix the plugin." % what)
    return conn
