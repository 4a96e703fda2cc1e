# -*- coding: utf-8 -*-
# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""PRIVATE to this collection: the proxy's unauthenticated ``/webapi/ping`` (I/O) and what it means.

Uses the standard library's urllib so the module needs no extra Python package, with its own TLS context (see
``web_context``).
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import json
import ssl

from ansible.module_utils.six.moves.urllib.error import HTTPError, URLError
from ansible.module_utils.six.moves.urllib.request import HTTPSHandler, Request, build_opener

from ansible_collections.lanyard.machine_id.plugins.module_utils._errors import LanyardError

KUBE_ADDR_EXPLANATION = (
    "TLS routing is off on this proxy (proxy.tls_routing_enabled is false) and no Kubernetes public address is set "
    "(proxy.kube.public_addr is empty), so Machine ID cannot tell which address to use for Kubernetes. For "
    "self-hosted clusters without TLS routing the Kubernetes public address must be set. Fix: set kube_public_addr "
    "in the proxy_service section of teleport.yaml (for example `kube_listen_addr: 0.0.0.0:3026` and "
    "`kube_public_addr: teleport.example.com:3026`) and restart the proxy, or enable TLS routing "
    "(proxy_listener_mode: multiplex)."
)


def web_context(ca_path=None, insecure=False):
    """TLS for the proxy's web address: the system trust (``SSL_CERT_FILE`` honoured) or ``ca_path``, host name
    checked. Python 3.13 turns on ``VERIFY_X509_STRICT`` by default, which refuses a chain whose certificates lack
    RFC 5280 key identifiers (Teleport's own self-signed web certificates, the test bed's and many private CAs);
    tctl and tbot (Go) accept them, and so does every older Python. Only that conformance check is dropped: the
    chain, the signatures, the expiry and the host name are verified as before."""
    ctx = ssl.create_default_context(cafile=ca_path) if ca_path else ssl.create_default_context()
    ctx.verify_flags &= ~getattr(ssl, "VERIFY_X509_STRICT", 0)
    if insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def open_web(url, method="GET", validate_certs=True, ca_path=None, timeout=30, headers=None):
    """GET ``url`` (HTTP proxies from the environment honoured, as urllib does)."""
    opener = build_opener(HTTPSHandler(context=web_context(ca_path, not validate_certs)))
    return opener.open(Request(url, headers=dict(headers or {}), method=method), timeout=timeout)


def web_base(proxy_addr):
    """``host:port`` or a URL -> ``https://host:port`` (port 443 when missing)."""
    addr = (proxy_addr or "").strip().rstrip("/")
    if not addr:
        raise LanyardError("proxy_addr is empty. Fix: set proxy_addr to the Teleport proxy's public address "
                           "(host:port).")
    if "://" in addr:
        scheme, rest = addr.split("://", 1)
        if scheme != "https":
            raise LanyardError("proxy_addr %s: the Teleport proxy speaks HTTPS. Fix: use https:// or host:port."
                               % proxy_addr)
        addr = rest
    host = addr.split("/", 1)[0]
    if not host.endswith("]") and ":" in host:
        return "https://%s" % host
    return "https://%s:443" % host


def fetch_ping(proxy_addr, ca_path=None, insecure=False, timeout=30, opener=None):
    """GET <proxy>/webapi/ping and return the parsed JSON."""
    url = web_base(proxy_addr) + "/webapi/ping"
    opener = opener or open_web
    try:
        resp = opener(url, method="GET", validate_certs=not insecure, ca_path=ca_path, timeout=timeout,
                      headers={"Accept": "application/json"})
        body = resp.read()
    except HTTPError as exc:
        raise LanyardError("GET %s failed: HTTP %s. Fix: check that proxy_addr points at the Teleport proxy's web "
                           "address." % (url, exc.code))
    except URLError as exc:
        reason = str(getattr(exc, "reason", exc))
        fix = "check proxy_addr and that the proxy is reachable from this host"
        if "CERTIFICATE_VERIFY_FAILED" in reason or "certificate" in reason.lower():
            fix = ("set ca_path to the CA that signed the proxy's HTTPS certificate (or install it in the system "
                   "trust store); insecure: true skips the check on test clusters only")
        raise LanyardError("Cannot reach the Teleport proxy at %s: %s. Fix: %s." % (url, reason, fix))
    except (OSError, ValueError) as exc:
        raise LanyardError("Cannot reach the Teleport proxy at %s: %s. Fix: check proxy_addr and that the proxy is "
                           "reachable from this host." % (url, exc))
    try:
        data = json.loads(body)
    except ValueError:
        raise LanyardError("%s did not answer with JSON. Fix: check that proxy_addr is the Teleport proxy's web "
                           "address, not another service." % url)
    if not isinstance(data, dict) or "proxy" not in data:
        raise LanyardError("%s answered JSON without a proxy section. Fix: check that proxy_addr is the Teleport "
                           "proxy's web address." % url)
    return data


def ping_facts(ping, proxy_addr):
    """The facts teleport_cluster_info returns, from a /webapi/ping answer."""
    proxy = ping.get("proxy") or {}
    kube = proxy.get("kube") or {}
    ssh = proxy.get("ssh") or {}
    auth = ping.get("auth") or {}
    tls_routing = bool(proxy.get("tls_routing_enabled"))
    public = ssh.get("public_addr") or proxy_addr
    if tls_routing:
        kube_addr = public
    else:
        kube_addr = kube.get("public_addr") or None
    return dict(
        cluster_name=ping.get("cluster_name"),
        server_version=ping.get("server_version"),
        min_client_version=ping.get("min_client_version"),
        tls_routing_enabled=tls_routing,
        proxy_public_addr=public,
        kube_enabled=bool(kube.get("enabled")),
        kube_public_addr=kube.get("public_addr") or None,
        kube_listen_addr=kube.get("listen_addr") or None,
        kube_addr=kube_addr,
        signature_algorithm_suite=auth.get("signature_algorithm_suite") or None,
    )


def check_kube_reachable(facts):
    """Raise the guide's explanation when Machine ID cannot find the Kubernetes address."""
    if not facts["tls_routing_enabled"] and not facts["kube_public_addr"]:
        raise LanyardError(KUBE_ADDR_EXPLANATION, facts=facts)
