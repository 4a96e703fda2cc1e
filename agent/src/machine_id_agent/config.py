# -*- coding: utf-8 -*-
# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Reading and validating the agent configuration (tbot's ``/etc/tbot.yaml``, v1 and v2 shapes).

``load(path)`` returns a :class:`Config` or raises :class:`ConfigError` with one line that names the key
(as a dotted path such as ``destinations[0].kubernetes_cluster``), the cause and the fix. Nothing here
touches the network; reading a token file is the only I/O besides the config file itself (a missing token
file is not an error here: :func:`read_token` reads it again when a join needs it).
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml

from machine_id_agent.errors import ConfigError

DEFAULT_PATH = "/etc/tbot.yaml"
DEFAULT_STORAGE = "/var/lib/teleport/bot"
DEFAULT_TTL = 3600
DEFAULT_RENEWAL = 1200
# Teleport caps renewable bot certificates at 24h; below 10s a renewal cannot finish in time.
MIN_TTL = 10
MAX_TTL = 24 * 3600
MIN_RENEWAL = 1
ACL_MODES = ("try", "required", "off")
SYMLINK_MODES = ("secure", "try-secure", "insecure")
DEFAULT_SYMLINKS = "try-secure"
JOIN_METHODS = ("token",)

_PIN_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
_DUR_RE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_DUR_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_USER_RE = re.compile(r"^[A-Za-z0-9_.][A-Za-z0-9_.-]*\$?$")


@dataclass
class KubeOutput:
    destination: Path
    kubernetes_cluster: str
    roles: List[str] = field(default_factory=list)
    reload_command: Optional[List[str]] = None
    # True (the default, like tbot): kubeconfig.yaml calls `machine-id-agent kube credentials`, which reads the
    # ``identity`` file at each (re)authentication, so a long-running client picks up renewed certificates.
    # False: inline credentials, loaded once by a client (it fails after credential_ttl).
    exec_plugin: bool = True
    readers: List[str] = field(default_factory=list)
    # tbot's per-directory keys: how to open the path and whether to use ACLs (None: the top-level acls)
    symlinks: str = DEFAULT_SYMLINKS
    acls: Optional[str] = None
    # True when the output has a readers: key; the list is then the exact set of readers on the ACL
    readers_managed: bool = False
    # "kubernetes" (one named cluster) or "kubernetes/v2" (the clusters the selectors pick, resolved at each
    # renewal; kubernetes_cluster is then empty)
    type: str = "kubernetes"
    selectors: List["KubeSelector"] = field(default_factory=list)
    context_name_template: str = "{{.ClusterName}}-{{.KubeName}}"
    default_namespace: Optional[str] = None

    @property
    def multi(self) -> bool:
        return self.type == KUBE_V2

    def describe(self) -> str:
        """The cluster(s) this output is for, for logs: the name, or the selectors."""
        if not self.multi:
            return self.kubernetes_cluster
        return "selectors %s" % ", ".join(s.describe() for s in self.selectors)


KUBE_V2 = "kubernetes/v2"
DEFAULT_CONTEXT_TEMPLATE = "{{.ClusterName}}-{{.KubeName}}"
# The only template actions accepted in context_name_template (Go template syntax, no other code).
_TEMPLATE_FIELDS = ("ClusterName", "KubeName")
_TEMPLATE_ACTION_RE = re.compile(r"{{\s*(.*?)\s*}}")
_NAMESPACE_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


@dataclass
class KubeSelector:
    """One ``selectors`` item of a kubernetes/v2 output: a cluster name, or labels that must all match."""
    name: Optional[str] = None
    labels: Dict[str, str] = field(default_factory=dict)

    def matches(self, cluster_name: str, cluster_labels: Dict[str, str]) -> bool:
        if self.name is not None:
            return cluster_name == self.name
        return all(cluster_labels.get(k) == v for k, v in self.labels.items())

    def describe(self) -> str:
        if self.name is not None:
            return "name=%s" % self.name
        return "labels={%s}" % ", ".join("%s: %s" % kv for kv in sorted(self.labels.items()))


def render_context_name(template: str, teleport_cluster: str, kube_cluster: str) -> str:
    """The context name for one cluster: ``{{.ClusterName}}`` is the Teleport cluster, ``{{.KubeName}}`` the
    Kubernetes cluster (whitespace inside the braces is allowed). Nothing else is evaluated."""
    values = {"ClusterName": teleport_cluster, "KubeName": kube_cluster}
    return _TEMPLATE_ACTION_RE.sub(lambda m: values[m.group(1)[1:]], template)


def check_context_template(template: str, key: str) -> str:
    for m in _TEMPLATE_ACTION_RE.finditer(template):
        action = m.group(1)
        if not action.startswith(".") or action[1:] not in _TEMPLATE_FIELDS:
            raise ConfigError("%s: {{%s}} is not supported; only {{.ClusterName}} (the Teleport cluster) and "
                              "{{.KubeName}} (the Kubernetes cluster) can be used, for example %r"
                              % (key, action, DEFAULT_CONTEXT_TEMPLATE))
    rest = _TEMPLATE_ACTION_RE.sub("", template)
    if "{{" in rest or "}}" in rest:
        raise ConfigError("%s: %r has an unbalanced {{ or }}; write it like %r"
                          % (key, template, DEFAULT_CONTEXT_TEMPLATE))
    if not any(m.group(1) == ".KubeName" for m in _TEMPLATE_ACTION_RE.finditer(template)):
        raise ConfigError("%s: %r does not contain {{.KubeName}}, so several clusters would get the same context "
                          "name; add it, for example %r" % (key, template, DEFAULT_CONTEXT_TEMPLATE))
    return template


@dataclass
class Config:
    auth_server: Optional[str] = None
    proxy_server: Optional[str] = None
    join_method: str = "token"
    token: Optional[str] = field(default=None, repr=False)
    ca_pins: List[str] = field(default_factory=list)
    ca_path: Optional[Path] = None
    insecure: bool = False
    storage_dir: Path = Path(DEFAULT_STORAGE)
    outputs: List[KubeOutput] = field(default_factory=list)
    credential_ttl: int = DEFAULT_TTL
    renewal_interval: int = DEFAULT_RENEWAL
    acls: str = "try"
    diag_addr: Optional[str] = None
    oneshot: bool = False
    source: Optional[Path] = None
    # extras beyond the shared interface (all defaulted, so older callers keep working)
    version: str = "v1"
    debug: bool = False
    token_path: Optional[Path] = None
    storage_symlinks: str = DEFAULT_SYMLINKS
    storage_acls: str = "try"
    watch_ca_rotations: bool = True

    @property
    def addr(self) -> str:
        """The address the agent dials first: the proxy if configured, else auth_server."""
        return self.proxy_server or self.auth_server or ""


def parse_duration(value: Any, key: str) -> int:
    """Go duration text ("1h", "20m", "90s", "1h30m", "1.5h") to whole seconds (rounded up)."""
    if isinstance(value, bool) or not isinstance(value, str):
        raise ConfigError(
            "%s: %r is not a duration; write it as a quoted Go duration such as \"20m\", \"1h\" or \"90s\""
            % (key, value))
    text = value.strip()
    if text == "0":
        return 0
    pos = 0
    total = 0.0
    for m in _DUR_RE.finditer(text):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _DUR_UNITS[m.group(2)]
        pos = m.end()
    if pos != len(text) or not text:
        raise ConfigError(
            "%s: %r is not a duration; use Go duration syntax with a unit, such as \"20m\", \"1h\" or \"90s\""
            % (key, value))
    secs = int(total)
    return secs + 1 if total > secs else secs


def format_duration(seconds: int) -> str:
    h, rest = divmod(int(seconds), 3600)
    m, s = divmod(rest, 60)
    out = ""
    if h:
        out += "%dh" % h
    if m:
        out += "%dm" % m
    if s or not out:
        out += "%ds" % s
    return out


class _Reader:
    """Walks one mapping, checking types and remembering which keys were consumed."""

    def __init__(self, data: Any, path: str, allowed: List[str]):
        if not isinstance(data, dict):
            raise ConfigError("%s: expected a mapping, got %s; write it as 'key: value' lines"
                              % (path or "top level", _typename(data)))
        self.data = data
        self.path = path
        self.allowed = allowed
        for key in data:
            if not isinstance(key, str) or key not in allowed:
                hint = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.6)
                fix = ("did you mean '%s'?" % hint[0]) if hint else ("allowed keys here: %s" % ", ".join(sorted(allowed)))
                raise ConfigError("%s: unknown key; %s" % (self.key(str(key)), fix))

    def key(self, name: str) -> str:
        return "%s.%s" % (self.path, name) if self.path else name

    def has(self, name: str) -> bool:
        return self.data.get(name) is not None

    def get(self, name: str, kind: type, default: Any = None, example: str = "") -> Any:
        value = self.data.get(name)
        if value is None:
            return default
        if kind is str and isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        if kind is bool and not isinstance(value, bool):
            raise ConfigError("%s: expected true or false, got %r" % (self.key(name), value))
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ConfigError("%s: expected %s, got %s%s" % (
                self.key(name), _kindname(kind), _typename(value),
                ("; for example: %s" % example) if example else ""))
        if kind is str and not value.strip():
            raise ConfigError("%s: is empty; %s" % (self.key(name), example or "set a value or remove the key"))
        return value

    def str_list(self, name: str, example: str) -> List[str]:
        value = self.data.get(name)
        if value is None:
            return []
        if isinstance(value, str):
            raise ConfigError("%s: expected a list, got a string; write it as a YAML list, for example: %s"
                              % (self.key(name), example))
        if not isinstance(value, list):
            raise ConfigError("%s: expected a list of strings, got %s; for example: %s"
                              % (self.key(name), _typename(value), example))
        out = []
        for i, item in enumerate(value):
            if isinstance(item, (int, float)) and not isinstance(item, bool):
                item = str(item)
            if not isinstance(item, str) or not item:
                raise ConfigError("%s[%d]: expected a non-empty string, got %r; for example: %s"
                                  % (self.key(name), i, item, example))
            out.append(item)
        return out


def _typename(v: Any) -> str:
    if v is None:
        return "nothing"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, dict):
        return "a mapping"
    if isinstance(v, list):
        return "a list"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, (int, float)):
        return "a number"
    return type(v).__name__


def _kindname(kind: type) -> str:
    return {str: "a string", int: "an integer", bool: "true or false", dict: "a mapping",
            list: "a list"}.get(kind, kind.__name__)


def check_addr(value: str, key: str, example: str = "teleport.example.com:443") -> str:
    v = value.strip()
    if "://" in v:
        raise ConfigError("%s: %r has a URL scheme; write only host:port, for example %r" % (key, value, example))
    if "/" in v or " " in v:
        raise ConfigError("%s: %r is not host:port; write it like %r" % (key, value, example))
    host, sep, port = v.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError("%s: %r needs a port; write it as host:port, for example %r" % (key, value, example))
    if host.startswith("[") != host.endswith("]"):
        raise ConfigError("%s: %r has an unbalanced IPv6 bracket; write it like '[::1]:3025'" % (key, value))
    return v


def _check_pin(pin: str, key: str) -> str:
    p = pin.strip().lower()
    if not _PIN_RE.match(p):
        raise ConfigError(
            "%s: %r is not a CA pin; copy it from 'tctl status' (CA pin): 'sha256:' followed by 64 hex digits"
            % (key, pin if len(pin) < 90 else pin[:87] + "..."))
    return p


def _read_token(value: str, key: str, base: Path) -> (Optional[str], Optional[Path]):
    """A token is either the value itself or an absolute path to a file holding it (tbot's rule).

    A token FILE is not required at load time: it is only needed when a join is (see :func:`read_token`),
    so a host that holds a valid identity keeps working after the spent token file was deleted. The value
    returned for a file is its content now, or None when it is missing or unreadable."""
    v = value.strip()
    if v.startswith("/") or v.startswith("./"):
        path = Path(v) if v.startswith("/") else (base / v)
        try:
            return _token_file(path, key, required=False), path
        except ConfigError:
            return None, path
    if any(c.isspace() for c in v):
        raise ConfigError("%s: the token contains whitespace; paste the join token exactly as 'tctl bots add' "
                          "printed it" % key)
    return v, None


def _token_file(path: Path, key: str, required: bool) -> Optional[str]:
    try:
        text = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        if not required:
            return None
        raise ConfigError("%s: token file %s does not exist; create it with the join token from "
                          "'tctl bots add' or put the token value in the config" % (key, path)) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError("%s: cannot read token file %s (%s); make it readable by the agent's user"
                          % (key, path, getattr(e, "strerror", None) or e)) from None
    if not text:
        if not required:
            return None
        raise ConfigError("%s: token file %s is empty; write the join token from 'tctl bots add' into it"
                          % (key, path))
    return text


def read_token(cfg: "Config", required: bool = False) -> Optional[str]:
    """The join token as configured NOW: the inline value, or the token file read at this moment (a new
    token written later is picked up without a restart). ``required`` (a join needs it): a missing, empty
    or unreadable file raises ConfigError; otherwise a missing or empty file gives None."""
    path = getattr(cfg, "token_path", None)
    if path is None:
        if required and not cfg.token:
            raise ConfigError("onboarding.token: missing; set it to the join token printed by 'tctl bots add' "
                              "(or to the absolute path of a file holding it)")
        return cfg.token
    return _token_file(Path(path), "onboarding.token", required)


def _check_user(name: str, key: str) -> str:
    if not _USER_RE.match(name) or len(name) > 64:
        raise ConfigError("%s: %r is not a valid user name; give a local Linux user name such as 'app'" % (key, name))
    return name


def _choice(r: _Reader, name: str, allowed, default: Optional[str]) -> Optional[str]:
    value = r.get(name, str, default)
    if value is None or value in allowed:
        return value
    hint = difflib.get_close_matches(value, allowed, n=1)
    suggestion = ("; did you mean '%s'?" % hint[0]) if hint else ""
    raise ConfigError("%s: %r is not one of %s%s" % (r.key(name), value, ", ".join(allowed), suggestion))


def _dir_opts(r: Optional[_Reader]):
    """(symlinks, acls) of a storage or destination directory mapping (tbot's keys)."""
    if r is None:
        return DEFAULT_SYMLINKS, None
    return _choice(r, "symlinks", SYMLINK_MODES, DEFAULT_SYMLINKS), _choice(r, "acls", ACL_MODES, None)


def _output(r: _Reader, dest: str, key_dest: str, cluster_key: str, base: Path,
            dir_reader: Optional[_Reader] = None, cluster_required: bool = True) -> KubeOutput:
    if not dest.startswith("/"):
        raise ConfigError("%s: %r is not an absolute path; write it like '/opt/machine-id'" % (key_dest, dest))
    cluster = r.get(cluster_key, str, example="kubernetes_cluster: example-k8s-cluster")
    if not cluster and not cluster_required:
        cluster = ""
    elif not cluster:
        raise ConfigError("%s: missing; set it to the cluster name shown by 'tsh kube ls', for example "
                          "'example-k8s-cluster'" % r.key(cluster_key))
    roles = r.str_list("roles", "roles: [k8s-reader]")
    reload_cmd = None
    if r.has("reload_command"):
        reload_cmd = r.str_list("reload_command", "reload_command: [systemctl, reload, myapp]")
        if not reload_cmd:
            raise ConfigError("%s: is an empty list; give the command as an argv list such as "
                              "[systemctl, reload, myapp] or remove the key" % r.key("reload_command"))
        if not (reload_cmd[0].startswith("/") or "/" not in reload_cmd[0]):
            raise ConfigError("%s[0]: %r must be an absolute path or a command name on PATH"
                              % (r.key("reload_command"), reload_cmd[0]))
    readers = [_check_user(u, "%s[%d]" % (r.key("readers"), i))
               for i, u in enumerate(r.str_list("readers", "readers: [app]"))]
    symlinks, acls = _dir_opts(dir_reader)
    return KubeOutput(destination=Path(os.path.normpath(dest)), kubernetes_cluster=cluster, roles=roles,
                      reload_command=reload_cmd, exec_plugin=r.get("exec_plugin", bool, True), readers=readers,
                      symlinks=symlinks, acls=acls, readers_managed=r.has("readers"))


def _selectors(r: _Reader) -> List[KubeSelector]:
    example = "selectors: [{labels: {env: prod}}, {name: example-k8s-cluster}]"
    raw = r.data.get("selectors")
    if raw is None or raw == []:
        raise ConfigError("%s: missing; a kubernetes/v2 output needs at least one selector, for example %s"
                          % (r.key("selectors"), example))
    if not isinstance(raw, list):
        raise ConfigError("%s: expected a list, got %s; for example %s" % (r.key("selectors"), _typename(raw), example))
    out = []
    for i, item in enumerate(raw):
        key = "%s[%d]" % (r.key("selectors"), i)
        s = _Reader(item, key, ["name", "labels"])
        if s.has("name") == s.has("labels"):
            raise ConfigError("%s: give exactly one of name or labels, for example {name: example-k8s-cluster} or "
                              "{labels: {env: prod}}" % key)
        if s.has("name"):
            out.append(KubeSelector(name=s.get("name", str, example="name: example-k8s-cluster")))
            continue
        labels = s.data["labels"]
        if not isinstance(labels, dict) or not labels:
            raise ConfigError("%s.labels: expected a non-empty mapping of label: value, for example "
                              "{labels: {env: prod}}" % key)
        clean = {}
        for k, v in labels.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                v = str(v)
            if not isinstance(k, str) or not k or not isinstance(v, str):
                raise ConfigError("%s.labels: %r: %r is not a label and a string value; quote the value, for example "
                                  "{env: \"prod\"}" % (key, k, v))
            clean[k] = v
        out.append(KubeSelector(labels=clean))
    return out


def _output_v2(r: _Reader, dest: str, key_dest: str, dir_reader: Optional[_Reader]) -> KubeOutput:
    if r.has("kubernetes_cluster"):
        raise ConfigError("%s: a kubernetes/v2 output picks its clusters with selectors; replace it with "
                          "selectors: [{name: %s}]" % (r.key("kubernetes_cluster"), r.data["kubernetes_cluster"]))
    out = _output(r, dest, key_dest, "kubernetes_cluster", Path("/"), dir_reader, cluster_required=False)
    out.type = KUBE_V2
    out.selectors = _selectors(r)
    tmpl = r.get("context_name_template", str, DEFAULT_CONTEXT_TEMPLATE,
                 example="context_name_template: \"{{.ClusterName}}-{{.KubeName}}\"")
    out.context_name_template = check_context_template(tmpl, r.key("context_name_template"))
    ns = r.get("default_namespace", str, example="default_namespace: demo")
    if ns is not None and not _NAMESPACE_RE.match(ns):
        raise ConfigError("%s: %r is not a Kubernetes namespace name; use lower-case letters, digits and '-', "
                          "for example 'demo'" % (r.key("default_namespace"), ns))
    out.default_namespace = ns
    return out


_OUTPUT_EXTRAS = ["reload_command", "readers", "exec_plugin", "roles"]
_V2_KEYS = ["selectors", "context_name_template", "default_namespace"]
_TOP_COMMON = ["version", "onboarding", "storage", "renewal_interval", "oneshot", "debug",
               "insecure", "acls", "diag_addr", "fips", "watch_ca_rotations"]
_TOP_V1 = _TOP_COMMON + ["auth_server", "proxy_server", "destinations", "certificate_ttl"]
_TOP_V2 = _TOP_COMMON + ["auth_server", "proxy_server", "outputs", "services", "credential_ttl"]
_ONBOARDING = ["join_method", "token", "ca_pins", "ca_path"]


def parse(data: Any, source: Optional[Path] = None) -> Config:
    """Validate an already-parsed YAML document."""
    base = source.parent if source else Path.cwd()
    if data is None:
        raise ConfigError("config: the file is empty; start from the example in docs/agent.md "
                          "(auth_server, onboarding.token, destinations)")
    if not isinstance(data, dict):
        raise ConfigError("config: the top level must be a mapping of keys, got %s" % _typename(data))
    version = data.get("version", "v1")
    if version not in ("v1", "v2"):
        raise ConfigError("version: %r is not supported; use v1 (the guide's shape) or v2" % (version,))
    top = _Reader(data, "", _TOP_V2 if version == "v2" else _TOP_V1)
    cfg = Config(source=source, version=version)

    if top.get("fips", bool, False):
        raise ConfigError("fips: FIPS mode is not supported by machine-id-agent; remove the key")
    cfg.auth_server = top.get("auth_server", str, example="auth_server: teleport.example.com:443")
    cfg.proxy_server = top.get("proxy_server", str, example="proxy_server: teleport.example.com:443")
    if cfg.auth_server:
        cfg.auth_server = check_addr(cfg.auth_server, "auth_server")
    if cfg.proxy_server:
        cfg.proxy_server = check_addr(cfg.proxy_server, "proxy_server")
    if cfg.auth_server and cfg.proxy_server:
        raise ConfigError("auth_server, proxy_server: both are set; keep only one (proxy_server for the "
                          "Teleport proxy address, auth_server for a direct auth server address)")
    if not cfg.auth_server and not cfg.proxy_server:
        raise ConfigError("%s: missing; set it to the Teleport address, for example "
                          "'teleport.example.com:443'" % ("proxy_server" if version == "v2" else "auth_server"))

    ob = _Reader(data.get("onboarding") if top.has("onboarding") else {}, "onboarding", _ONBOARDING)
    cfg.join_method = ob.get("join_method", str, "token")
    if cfg.join_method not in JOIN_METHODS:
        raise ConfigError("onboarding.join_method: %r is not supported; machine-id-agent joins with "
                          "join_method: token" % cfg.join_method)
    tok = ob.get("token", str, example="token: <the join token from 'tctl bots add'>")
    if tok is None:
        raise ConfigError("onboarding.token: missing; set it to the join token printed by 'tctl bots add' "
                          "(or to the absolute path of a file holding it)")
    cfg.token, cfg.token_path = _read_token(tok, "onboarding.token", base)
    cfg.ca_pins = [_check_pin(p, "onboarding.ca_pins[%d]" % i)
                   for i, p in enumerate(ob.str_list("ca_pins", "ca_pins: ['sha256:<64 hex digits>']"))]
    ca_path = ob.get("ca_path", str)
    if ca_path:
        p = Path(ca_path) if ca_path.startswith("/") else base / ca_path
        try:
            found = p.is_file()
        except OSError as e:  # e.g. a directory on the way this user may not search
            raise ConfigError("onboarding.ca_path: cannot reach %s (%s); make it and its directories readable by "
                              "the agent's user (the role's config directory is 0755, the file 0644)"
                              % (p, e.strerror or e)) from None
        if not found:
            raise ConfigError("onboarding.ca_path: %s does not exist; point it at the PEM file of the CA that "
                              "signs the Teleport proxy's HTTPS certificate, or remove the key" % p)
        cfg.ca_path = p
    cfg.insecure = top.get("insecure", bool, False)

    # storage
    storage_acls = None
    st_raw = data.get("storage")
    if st_raw is not None:
        if version == "v2":
            st = _Reader(st_raw, "storage", ["type", "path", "symlinks", "acls"])
            stype = st.get("type", str, "directory")
            if stype != "directory":
                raise ConfigError("storage.type: %r is not supported; use type: directory" % stype)
            path = st.get("path", str)
            if not path:
                raise ConfigError("storage.path: missing; set it to the bot's data directory such as "
                                  "'/var/lib/teleport/bot'")
            key = "storage.path"
            cfg.storage_symlinks, storage_acls = _dir_opts(st)
        else:
            st = _Reader(st_raw, "storage", ["directory"])
            d = st.data.get("directory")
            if isinstance(d, dict):
                sd = _Reader(d, "storage.directory", ["path", "symlinks", "acls"])
                path, key = sd.get("path", str), "storage.directory.path"
                cfg.storage_symlinks, storage_acls = _dir_opts(sd)
            else:
                path, key = st.get("directory", str), "storage.directory"
            if not path:
                raise ConfigError("storage.directory: missing; set it to the bot's data directory such as "
                                  "'/var/lib/teleport/bot'")
        if not path.startswith("/"):
            raise ConfigError("%s: %r is not an absolute path; write it like '/var/lib/teleport/bot'" % (key, path))
        cfg.storage_dir = Path(os.path.normpath(path))

    # outputs
    if version == "v2":
        items = []
        for lk in ("outputs", "services"):
            raw = data.get(lk)
            if raw is None:
                continue
            if not isinstance(raw, list):
                raise ConfigError("%s: expected a list of outputs, got %s" % (lk, _typename(raw)))
            items += [("%s[%d]" % (lk, i), o) for i, o in enumerate(raw)]
        for key, o in items:
            otype = o.get("type") if isinstance(o, dict) else None
            r = _Reader(o, key, ["type", "kubernetes_cluster", "destination", "name"] + _OUTPUT_EXTRAS
                        + (_V2_KEYS if otype == KUBE_V2 else []))
            otype = r.get("type", str)
            if otype not in ("kubernetes", KUBE_V2):
                raise ConfigError("%s.type: %r is not supported; machine-id-agent writes type: kubernetes (one "
                                  "cluster) and type: kubernetes/v2 (clusters chosen by selectors) outputs"
                                  % (key, otype))
            if not r.has("destination"):
                raise ConfigError("%s.destination: missing; add destination: {type: directory, path: "
                                  "/opt/machine-id}" % key)
            d = _Reader(r.data["destination"], key + ".destination", ["type", "path", "symlinks", "acls"])
            dtype = d.get("type", str, "directory")
            if dtype != "directory":
                raise ConfigError("%s.destination.type: %r is not supported; use type: directory" % (key, dtype))
            path = d.get("path", str)
            if not path:
                raise ConfigError("%s.destination.path: missing; set it like '/opt/machine-id'" % key)
            if otype == KUBE_V2:
                cfg.outputs.append(_output_v2(r, path, key + ".destination.path", d))
            else:
                cfg.outputs.append(_output(r, path, key + ".destination.path", "kubernetes_cluster", base, d))
    else:
        raw = data.get("destinations")
        if raw is not None and not isinstance(raw, list):
            raise ConfigError("destinations: expected a list, got %s; write '- directory: /opt/machine-id' items"
                              % _typename(raw))
        for i, o in enumerate(raw or []):
            key = "destinations[%d]" % i
            # selectors (with context_name_template, default_namespace) instead of kubernetes_cluster: a
            # kubernetes/v2 output in the v1 shape (a machine-id-agent extension; the role writes it)
            r = _Reader(o, key, ["directory", "kubernetes_cluster"] + _OUTPUT_EXTRAS + _V2_KEYS)
            d = r.data.get("directory")
            dd = None
            if isinstance(d, dict):
                dd = _Reader(d, key + ".directory", ["path", "symlinks", "acls"])
                path, pkey = dd.get("path", str), key + ".directory.path"
            else:
                path, pkey = r.get("directory", str), key + ".directory"
            if not path:
                raise ConfigError("%s.directory: missing; set it like '/opt/machine-id'" % key)
            if r.has("selectors") or (not r.has("kubernetes_cluster") and any(r.has(k) for k in _V2_KEYS)):
                cfg.outputs.append(_output_v2(r, path, pkey, dd))
                continue
            if not r.has("kubernetes_cluster"):
                raise ConfigError("%s.kubernetes_cluster: missing; machine-id-agent only writes Kubernetes "
                                  "outputs; set it to the name shown by 'tsh kube ls' (or give selectors for "
                                  "several clusters)" % key)
            cfg.outputs.append(_output(r, path, pkey, "kubernetes_cluster", base, dd))
    if not cfg.outputs:
        raise ConfigError("%s: no outputs; add one, for example %s" % (
            "outputs" if version == "v2" else "destinations",
            "'- {type: kubernetes, kubernetes_cluster: example-k8s-cluster, destination: {type: directory, "
            "path: /opt/machine-id}}'" if version == "v2" else
            "'- {directory: /opt/machine-id, kubernetes_cluster: example-k8s-cluster}'"))
    seen = {}
    for i, o in enumerate(cfg.outputs):
        if o.destination in seen:
            raise ConfigError("%s: directory %s is used by two outputs; give each output its own directory"
                              % ("outputs" if version == "v2" else "destinations", o.destination))
        if o.destination == cfg.storage_dir:
            raise ConfigError("%s: directory %s is also the storage directory; the bot identity must not be "
                              "shared with readers, use another directory" % (
                                  "outputs" if version == "v2" else "destinations", o.destination))
        seen[o.destination] = i

    ttl_key = "credential_ttl" if version == "v2" else "certificate_ttl"
    if top.has(ttl_key):
        cfg.credential_ttl = parse_duration(data[ttl_key], ttl_key)
    if top.has("renewal_interval"):
        cfg.renewal_interval = parse_duration(data["renewal_interval"], "renewal_interval")
    if not MIN_TTL <= cfg.credential_ttl <= MAX_TTL:
        raise ConfigError("%s: %s is out of range; choose between %s and %s (Teleport caps bot certificates "
                          "at 24h)" % (ttl_key, format_duration(cfg.credential_ttl), format_duration(MIN_TTL),
                                       format_duration(MAX_TTL)))
    if cfg.renewal_interval < MIN_RENEWAL:
        raise ConfigError("renewal_interval: must be at least 1s; the default is 20m")
    if cfg.renewal_interval >= cfg.credential_ttl:
        raise ConfigError("renewal_interval: %s is not shorter than %s %s; renew well before expiry, for example "
                          "renewal_interval %s" % (format_duration(cfg.renewal_interval), ttl_key,
                                                   format_duration(cfg.credential_ttl),
                                                   format_duration(max(1, cfg.credential_ttl // 3))))

    cfg.acls = top.get("acls", str, "try")
    if cfg.acls not in ACL_MODES:
        hint = difflib.get_close_matches(cfg.acls, ACL_MODES, n=1)
        raise ConfigError("acls: %r is not one of try, required, off%s" % (
            cfg.acls, ("; did you mean '%s'?" % hint[0]) if hint else ""))
    # a directory's own acls wins; destinations without one follow the top-level acls, storage defaults to try
    for o in cfg.outputs:
        o.acls = o.acls or cfg.acls
    cfg.storage_acls = storage_acls or "try"
    diag = top.get("diag_addr", str, example="diag_addr: 127.0.0.1:9191")
    if diag:
        cfg.diag_addr = check_addr(diag, "diag_addr", "127.0.0.1:9191")
    cfg.oneshot = top.get("oneshot", bool, False)
    cfg.watch_ca_rotations = top.get("watch_ca_rotations", bool, True)
    cfg.debug = top.get("debug", bool, False)
    return cfg


def load(path: Any = DEFAULT_PATH) -> Config:
    """Read and validate the configuration file at ``path``. Raises ConfigError."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("config %s: file not found; write it (see docs/agent.md) or pass -c FILE" % p) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError("config %s: cannot read it (%s); check its permissions and encoding"
                          % (p, getattr(e, "strerror", None) or e)) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = (" line %d column %d" % (mark.line + 1, mark.column + 1)) if mark else ""
        problem = getattr(e, "problem", None) or "invalid YAML"
        raise ConfigError("config %s:%s: %s; fix the YAML syntax (indent with spaces, quote values with ':')"
                          % (p, where, problem)) from None
    return parse(data, source=p.resolve() if p.exists() else p)
