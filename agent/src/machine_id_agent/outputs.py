# -*- coding: utf-8 -*-
# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Kubernetes outputs: rendering ``kubeconfig.yaml`` like tbot and writing the destination files.

Files in each destination directory (each written atomically, ACL set before it appears):
``key`` (PEM private key), ``tlscert`` (PEM certificate routed to the Kubernetes cluster),
``teleport-host-ca.crt`` (PEM host CA bundle), ``identity`` (exec-plugin mode, the default: key, SSH certificate and
TLS certificate in one file, Teleport's identity file format, so the exec plugin -- ours or tbot's -- reads a matching
pair), ``identity.validity.json`` (exec-plugin mode: the identity file's hash and validity, so the plugin need not
read the certificate, see kubecreds.VALIDITY) and, last, ``kubeconfig.yaml``.
"""

from __future__ import annotations

import base64
import datetime as _dt
import ipaddress
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import yaml

from machine_id_agent import acl as aclmod
from machine_id_agent import fsutil
from machine_id_agent.config import KubeOutput
from machine_id_agent.errors import OutputError
# reading a destination's credentials (and the exec plugin) lives in kubecreds, which imports little: kubectl
# starts the plugin for every call
from machine_id_agent.kubecreds import (EXEC_API_VERSION, IDENTITY, IDENTITY_PREFIX, KUBECONFIG, VALIDITY,
                                        cert_not_after, identity_name, key_matches_cert, read_credentials,
                                        validity_record)

KEY = "key"
TLSCERT = "tlscert"
HOST_CA = "teleport-host-ca.crt"
ALPN_SNI_PREFIX = "kube-teleport-proxy-alpn."
DEFAULT_KUBE_PORT = 3026


@dataclass
class KubeEndpoint:
    server: str
    tls_server_name: Optional[str] = None


def _split_hostport(addr: str):
    addr = addr.strip()
    if addr.startswith("["):
        host, _sep, rest = addr[1:].partition("]")
        return host, rest[1:] if rest.startswith(":") else ""
    if addr.count(":") == 1:
        host, _sep, port = addr.partition(":")
        return host, port
    return addr, ""


def _join_hostport(host: str, port: Any) -> str:
    if ":" in host:
        host = "[%s]" % host
    return "%s:%s" % (host, port) if port not in (None, "") else host


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def _raw_get(raw: Any, *keys) -> Any:
    cur = raw
    for k in keys:
        if not isinstance(cur, dict):
            return None
        cur = cur.get(k)
    return cur or None


def kube_endpoint(facts: Any, proxy_addr: Optional[str] = None) -> KubeEndpoint:
    """Where kubectl connects, from the proxy's ping answer (tbot's rules).

    TLS routing: ``https://<proxy public addr>`` with SNI ``kube-teleport-proxy-alpn.<proxy host>``
    (``...teleport.cluster.local`` when the host is empty or an IP). Without TLS routing:
    ``https://<kube public addr>``, else ``https://<proxy host>:<kube listen port>``.
    """
    if facts is None:
        raise OutputError("kubeconfig: the Teleport proxy address is unknown (no /webapi/ping answer); set "
                          "proxy_server (v2) or point auth_server at the proxy's web address")
    raw = getattr(facts, "raw", None) or {}
    public = (_raw_get(raw, "proxy", "ssh", "public_addr") or getattr(facts, "web_addr", None) or proxy_addr or "")
    host, port = _split_hostport(public)
    if getattr(facts, "tls_routing", False):
        sni_host = "teleport.cluster.local" if (not host or _is_ip(host)) else host
        return KubeEndpoint("https://" + _join_hostport(host or "127.0.0.1", port or 443), ALPN_SNI_PREFIX + sni_host)
    kpub = getattr(facts, "kube_public_addr", None)
    if kpub:
        kh, kp = _split_hostport(kpub)
        return KubeEndpoint("https://" + _join_hostport(kh, kp or DEFAULT_KUBE_PORT))
    listen = getattr(facts, "kube_listen_addr", None)
    lport = _split_hostport(listen)[1] if listen else ""
    if not host:
        raise OutputError("kubeconfig: the proxy reports no public address and no kube public_addr; set "
                          "proxy_service.kube_public_addr in teleport.yaml or use TLS routing")
    return KubeEndpoint("https://" + _join_hostport(host, lport or DEFAULT_KUBE_PORT))


INSTALL_HINT = ("machine-id-agent writes this kubeconfig and renews its certificate; the command above is the agent's "
                "own console script (installed by the lanyard.machine_id.machine_id role in its virtualenv). If it is "
                "missing, re-run the role, or set exec_plugin: false on this output for inline credentials.")


def plugin_program() -> List[str]:
    """The absolute command that runs this very installation of the agent (never one found on PATH).

    The console script this process was started as; else the console script of the environment this
    interpreter belongs to (a virtualenv's ``bin/machine-id-agent``); else this interpreter with
    ``-m machine_id_agent``."""
    argv0 = sys.argv[0] if sys.argv else ""
    if os.path.basename(argv0) == "machine-id-agent" and os.path.isfile(argv0):
        return [os.path.abspath(argv0)]
    script = os.path.join(sys.prefix, "bin", "machine-id-agent")
    if os.path.isfile(script) and os.access(script, os.X_OK):
        return [os.path.abspath(script)]
    return [os.path.abspath(sys.executable), "-m", "machine_id_agent"]


def exec_command(destination: Path, cluster: Optional[str] = None) -> Dict[str, Any]:
    """The exec stanza that calls ``machine-id-agent kube credentials --destination-dir D``.

    The plugin needs no network, no privileges and no write access: it reads the ``identity`` file (key and
    certificate in one atomically replaced file) and prints an ExecCredential whose expirationTimestamp makes
    client-go run it again before the certificate expires."""
    prog = plugin_program()
    args = prog[1:] + ["kube", "credentials", "--destination-dir", str(destination)]
    if cluster is not None:
        args += ["--cluster", cluster]
    return {"apiVersion": EXEC_API_VERSION, "command": prog[0], "args": args,
            "installHint": INSTALL_HINT, "interactiveMode": "Never", "provideClusterInfo": False}


def render_kubeconfig(teleport_cluster: str, kube_cluster: str, endpoint: KubeEndpoint, host_ca_pems: Sequence[bytes],
                      key_pem: Optional[bytes] = None, cert_pem: Optional[bytes] = None,
                      exec_stanza: Optional[Dict[str, Any]] = None) -> bytes:
    name = "%s-%s" % (teleport_cluster, kube_cluster)
    cluster: Dict[str, Any] = {
        "certificate-authority-data": base64.b64encode(b"".join(_nl(p) for p in host_ca_pems)).decode(),
        "server": endpoint.server,
    }
    if endpoint.tls_server_name:
        cluster["tls-server-name"] = endpoint.tls_server_name
    if exec_stanza is not None:
        user: Dict[str, Any] = {"exec": exec_stanza}
    else:
        if key_pem is None or cert_pem is None:
            raise ValueError("inline credentials need key and certificate")
        user = {"client-certificate-data": base64.b64encode(cert_pem).decode(),
                "client-key-data": base64.b64encode(key_pem).decode()}
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "preferences": {},
        "clusters": [{"name": name, "cluster": cluster}],
        "users": [{"name": name, "user": user}],
        "contexts": [{"name": name, "context": {"cluster": name, "user": name}}],
        "current-context": name,
    }
    return yaml.safe_dump(doc, default_flow_style=False, sort_keys=False).encode()


def _nl(pem: bytes) -> bytes:
    return pem if pem.endswith(b"\n") else pem + b"\n"


@dataclass
class WriteResult:
    destination: str
    not_after: Optional[_dt.datetime]
    acl_changes: List[str] = field(default_factory=list)
    clusters: List[str] = field(default_factory=list)  # kubernetes/v2: the clusters written
    cluster_not_after: Dict[str, _dt.datetime] = field(default_factory=dict)  # kubernetes/v2: expiry per cluster


def write_kube(output: KubeOutput, creds: Any, teleport_cluster: str, endpoint: KubeEndpoint,
               acls: Optional[str] = None, reader_uids: Sequence[int] = (),
               warn: Optional[Callable[[str], None]] = None, symlinks: Optional[str] = None,
               revoke: Sequence[int] = ()) -> WriteResult:
    """Write one Kubernetes output. ``creds`` is a renew.KubeCredentials (key_pem, cert_pem, host_ca_pems,
    not_after). The destination is opened under ``symlinks`` (default: the output's own setting) and every
    file is written relative to that descriptor; each file is atomic; kubeconfig.yaml is written last.
    ``acls`` defaults to the output's own setting, then ``try``."""
    acls = acls or getattr(output, "acls", None) or "try"
    symlinks = symlinks or getattr(output, "symlinks", None) or fsutil.DEFAULT_SYMLINKS
    warn = warn or (lambda m: None)
    with fsutil.open_dir(output.destination, symlinks, create=0o700, warn=warn) as d:
        d.clean_temp_files()
        policy, changes = _ensure_dir_acl(d, output, acls, reader_uids, warn, revoke)

        def prep(name: str) -> Callable[[int], None]:
            return lambda fd: policy.ensure(fd, False, d.name(name))

        host_cas = b"".join(_nl(p) for p in creds.host_ca_pems)
        files = [(KEY, creds.key_pem), (TLSCERT, creds.cert_pem), (HOST_CA, host_cas)]
        dest = Path(output.destination)
        if output.exec_plugin:
            ssh = (getattr(creds, "ssh_cert", b"") or b"").strip()
            # a Teleport identity file (key, SSH certificate line, TLS certificate), as tbot writes it: the agent's
            # plugin reads the key and the first certificate; a kubeconfig tbot wrote before the agent took the host
            # over runs `tbot kube credentials`, which reads this file too and needs the SSH certificate line
            ident = _nl(creds.key_pem) + (ssh + b"\n" if ssh else b"") + _nl(creds.cert_pem)
            files += [(IDENTITY, ident), (VALIDITY, _validity_file({IDENTITY: (ident, creds)}))]
            kc = render_kubeconfig(teleport_cluster, output.kubernetes_cluster, endpoint, creds.host_ca_pems,
                                   exec_stanza=exec_command(dest))
        else:
            kc = render_kubeconfig(teleport_cluster, output.kubernetes_cluster, endpoint, creds.host_ca_pems,
                                   key_pem=creds.key_pem, cert_pem=creds.cert_pem)
        files.append((KUBECONFIG, kc))
        for name, data in files:
            d.write(name, data, 0o600, prepare=prep(name), sync_dir=False)
        if not output.exec_plugin:
            # a file from an earlier exec-plugin configuration must not keep the old key readable
            d.unlink(IDENTITY)
            d.unlink(VALIDITY)
        d.fsync()
    not_after = getattr(creds, "not_after", None) or cert_not_after(creds.cert_pem)
    return WriteResult(str(dest), not_after, changes)


def _validity_file(identities: Dict[str, Any]) -> bytes:
    """kubecreds.VALIDITY for ``identities`` (file name -> (its bytes, the credentials in it))."""
    records = {}
    for name, (data, c) in identities.items():
        record = validity_record(data, c.key_pem, c.cert_pem)
        if record is not None:
            records[name] = record
    return (json.dumps(records, sort_keys=True) + "\n").encode()


def _ensure_dir_acl(d: fsutil.Dir, output: Any, acls: str, reader_uids: Sequence[int],
                    warn: Callable[[str], None], revoke: Sequence[int]):
    policy = aclmod.runtime_policy(d.fd, acls, reader_uids, warn=warn,
                                   managed=bool(getattr(output, "readers_managed", False)), revoke=revoke,
                                   where=d.path)
    changes: List[str] = []
    try:
        if policy.ensure(d.fd, True, d.path):
            changes.append(d.path)
    except OutputError as e:
        if acls == "required":
            raise
        warn(str(e))
    return policy, changes


def apply_acls(output: KubeOutput, acls: Optional[str] = None, reader_uids: Sequence[int] = (),
               revoke: Sequence[int] = (), warn: Optional[Callable[[str], None]] = None,
               symlinks: Optional[str] = None) -> List[str]:
    """Re-apply a destination's ACL to the directory and the output files already in it, without new
    credentials (used at a config reload, so a reader removed from ``readers:`` loses access at once).
    Returns what changed. A missing destination is left alone (the next renewal creates it)."""
    acls = acls or getattr(output, "acls", None) or "try"
    symlinks = symlinks or getattr(output, "symlinks", None) or fsutil.DEFAULT_SYMLINKS
    warn = warn or (lambda m: None)
    try:
        d = fsutil.open_dir(output.destination, symlinks, warn=warn)
    except OutputError:
        if not os.path.lexists(str(output.destination)):
            return []
        raise
    with d:
        policy, changes = _ensure_dir_acl(d, output, acls, reader_uids, warn, revoke)
        names = list(aclmod.ARTIFACTS) + sorted(n for n in d.listdir() if n.startswith(IDENTITY_PREFIX))
        changes += aclmod.apply_files(d, policy, names)
    return changes


def inspect(destination: Path, now: Optional[_dt.datetime] = None) -> Dict[str, Any]:
    """What is on disk in one destination, for status, wait and readiness. Never raises."""
    now = now or _dt.datetime.now(_dt.timezone.utc)
    dest = Path(destination)
    out: Dict[str, Any] = {"destination": str(dest), "present": False, "valid": False, "expires": None,
                           "seconds_to_expiry": None, "error": None}
    try:
        kc = fsutil.read_bytes(dest / KUBECONFIG)
        if kc is None:
            out["error"] = "no %s yet" % KUBECONFIG
            return out
        out["present"] = True
        names = _cluster_identities(dest)
        if names is not None and fsutil.read_bytes(dest / IDENTITY) is None:
            return _inspect_multi(dest, kc, names, now, out)
        try:
            creds = read_credentials(dest)
        except OutputError:
            creds = None
        if creds is None:
            if names is None and fsutil.read_bytes(dest / IDENTITY) is None and _no_context(kc):
                # a kubernetes/v2 output whose selectors matched nothing at its last renewal
                out["clusters"] = []
                out["error"] = ("%s has no context: the output's selectors match no Kubernetes cluster its roles "
                                "may access (check the labels with `tctl get kube_server` and the selectors)"
                                % KUBECONFIG)
                return out
            out["error"] = "no %s (what the exec plugin reads) and no inline credentials in %s" % (IDENTITY, KUBECONFIG)
            return out
        na = cert_not_after(creds["cert"])
        out["expires"] = na.isoformat()
        out["seconds_to_expiry"] = int((na - now).total_seconds())
        if not key_matches_cert(creds["key"], creds["cert"]):
            out["error"] = "certificate does not match key"
            return out
        out["valid"] = na > now
        if not out["valid"]:
            out["error"] = "certificate expired"
    except PermissionError as e:
        out["error"] = "permission denied: %s" % (e.filename or dest)
    except Exception as e:  # a damaged file must not crash status/wait
        out["error"] = "unreadable: %s" % (str(e).splitlines() or [type(e).__name__])[0]
    return out


def _no_context(kc: bytes) -> bool:
    """True for a kubeconfig that has an empty list of contexts (what a kubernetes/v2 output with no selected
    cluster writes)."""
    try:
        doc = yaml.safe_load(kc)
    except yaml.YAMLError:
        return False
    return isinstance(doc, dict) and doc.get("contexts") == []


def _cluster_identities(dest: Path) -> Optional[List[str]]:
    """The clusters with an identity file in a kubernetes/v2 destination, or None when it is not one."""
    try:
        names = sorted(n[len(IDENTITY_PREFIX):] for n in os.listdir(str(dest)) if n.startswith(IDENTITY_PREFIX))
    except OSError:
        return None
    return names or None


def _inspect_multi(dest: Path, kc: bytes, clusters: List[str], now: _dt.datetime,
                   out: Dict[str, Any]) -> Dict[str, Any]:
    """inspect() of a kubernetes/v2 destination: valid when every cluster's identity is; expiry is the soonest."""
    out["clusters"] = clusters
    out["cluster_expires"] = {}
    soonest = None
    for c in clusters:
        creds = read_credentials(dest, c)
        na = cert_not_after(creds["cert"])
        if not key_matches_cert(creds["key"], creds["cert"]):
            out["error"] = "%s: certificate does not match key" % identity_name(c)
            return out
        out["cluster_expires"][c] = na.isoformat()
        soonest = na if soonest is None or na < soonest else soonest
    out["expires"] = soonest.isoformat()
    out["seconds_to_expiry"] = int((soonest - now).total_seconds())
    out["valid"] = soonest > now
    if not out["valid"]:
        out["error"] = "certificate expired"
    return out


@dataclass
class KubeContext:
    """One cluster of a kubernetes/v2 kubeconfig."""
    name: str  # context, cluster and user entry name (from context_name_template)
    kube_cluster: str
    user: Dict[str, Any]


def render_kubeconfig_multi(contexts: Sequence[KubeContext], endpoint: KubeEndpoint, host_ca_pems: Sequence[bytes],
                            default_namespace: Optional[str] = None) -> bytes:
    """A kubeconfig with one cluster, user and context per entry (all through the same Teleport proxy; the
    certificate routes each to its Kubernetes cluster); current-context is the first entry. No entries: a
    valid kubeconfig without contexts."""
    ca = base64.b64encode(b"".join(_nl(p) for p in host_ca_pems)).decode()
    clusters, users, ctxs = [], [], []
    for c in contexts:
        cluster: Dict[str, Any] = {"certificate-authority-data": ca, "server": endpoint.server}
        if endpoint.tls_server_name:
            cluster["tls-server-name"] = endpoint.tls_server_name
        clusters.append({"name": c.name, "cluster": cluster})
        users.append({"name": c.name, "user": c.user})
        ctx: Dict[str, Any] = {"cluster": c.name, "user": c.name}
        if default_namespace:
            ctx["namespace"] = default_namespace
        ctxs.append({"name": c.name, "context": ctx})
    doc: Dict[str, Any] = {"apiVersion": "v1", "kind": "Config", "preferences": {}, "clusters": clusters,
                           "users": users, "contexts": ctxs}
    if contexts:
        doc["current-context"] = contexts[0].name
    return yaml.safe_dump(doc, default_flow_style=False, sort_keys=False).encode()


def write_kube_multi(output: KubeOutput, creds: Dict[str, Any], teleport_cluster: str, endpoint: KubeEndpoint,
                     host_ca_pems: Sequence[bytes], acls: Optional[str] = None, reader_uids: Sequence[int] = (),
                     warn: Optional[Callable[[str], None]] = None, symlinks: Optional[str] = None,
                     revoke: Sequence[int] = ()) -> WriteResult:
    """Write a kubernetes/v2 output: ``creds`` maps each selected cluster to its renew.KubeCredentials.

    Order: the host CA, then (exec plugin) one ``identity-<cluster>`` per cluster (key and certificate in one
    atomic file), then ``kubeconfig.yaml`` (one context per cluster, sorted by context name, the first is
    current), then the identity files of clusters no longer selected are removed. A reader therefore always
    finds a matching key and certificate for every context of the kubeconfig it read. ``creds`` may be empty:
    the kubeconfig then has no context. ``not_after`` of the result is the soonest expiry (None when empty)."""
    from machine_id_agent.config import render_context_name

    acls = acls or getattr(output, "acls", None) or "try"
    symlinks = symlinks or getattr(output, "symlinks", None) or fsutil.DEFAULT_SYMLINKS
    warn = warn or (lambda m: None)
    dest = Path(output.destination)
    contexts: List[KubeContext] = []
    files = [(HOST_CA, b"".join(_nl(p) for p in host_ca_pems))]
    identities = {}
    for cluster in sorted(creds):
        c = creds[cluster]
        name = render_context_name(output.context_name_template, teleport_cluster, cluster)
        if output.exec_plugin:
            fname = identity_name(cluster)
            identities[fname] = (_nl(c.key_pem) + _nl(c.cert_pem), c)
            files.append((fname, identities[fname][0]))
            user: Dict[str, Any] = {"exec": exec_command(dest, cluster)}
        else:
            user = {"client-certificate-data": base64.b64encode(c.cert_pem).decode(),
                    "client-key-data": base64.b64encode(c.key_pem).decode()}
        contexts.append(KubeContext(name, cluster, user))
    contexts.sort(key=lambda k: k.name)
    seen = set()
    for k in contexts:
        if k.name in seen:
            raise OutputError("%s: context name %r is rendered for two clusters; put {{.KubeName}} in "
                              "context_name_template" % (dest, k.name))
        seen.add(k.name)
    if identities:
        files.append((VALIDITY, _validity_file(identities)))
    files.append((KUBECONFIG, render_kubeconfig_multi(contexts, endpoint, host_ca_pems, output.default_namespace)))
    keep = {fname for fname, _data in files}
    with fsutil.open_dir(dest, symlinks, create=0o700, warn=warn) as d:
        d.clean_temp_files()
        policy, changes = _ensure_dir_acl(d, output, acls, reader_uids, warn, revoke)
        for name, data in files:
            d.write(name, data, 0o600, prepare=lambda fd, n=name: policy.ensure(fd, False, d.name(n)),
                    sync_dir=False)
        # after the kubeconfig: clusters no longer selected, and files of a kubernetes (v1) output here before
        for name in d.listdir():
            if name in (IDENTITY, KEY, TLSCERT) or (
                    name not in keep and (name.startswith(IDENTITY_PREFIX) or name == VALIDITY)):
                d.unlink(name)
        d.fsync()
    expiry = {n: getattr(c, "not_after", None) or cert_not_after(c.cert_pem) for n, c in creds.items()}
    soonest = min(expiry.values()) if expiry else None
    return WriteResult(str(dest), soonest, changes, sorted(creds), expiry)
