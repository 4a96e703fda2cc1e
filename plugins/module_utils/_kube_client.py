# -*- coding: utf-8 -*-
# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""PRIVATE to this collection: HTTP I/O with the Kubernetes API (``requests``), nothing else.

:class:`KubeClient` is a context manager around one ``requests.Session`` built from a
:class:`~._kube_config.Connection`. Inline certificate data is written to 0600 files in a 0700 temporary
directory for the life of the client and removed on exit. Failures raise :class:`KubeAPIError` (a
:class:`LanyardError` carrying the HTTP status and the server's Status object); turning them into messages
that name the object and the fix is the caller's job (see ``_kube_resource.explain_api_error``).
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import json
import os
import ssl
import shutil
import tempfile
import warnings

from ansible.module_utils.six.moves.urllib.parse import urlparse

from ansible_collections.lanyard.machine_id.plugins.module_utils._errors import LanyardError
from ansible_collections.lanyard.machine_id.plugins.module_utils._kube_config import bypasses_proxy

try:
    import requests
    from requests.adapters import HTTPAdapter
    from requests.utils import get_environ_proxies
    from urllib3.util.ssl_ import create_urllib3_context
    HAS_REQUESTS = True
    REQUESTS_IMPORT_ERROR = None
except ImportError as _exc:  # pragma: no cover - reported by the module as missing_required_lib
    HAS_REQUESTS = False
    REQUESTS_IMPORT_ERROR = _exc
    HTTPAdapter = object

FIELD_MANAGER = "lanyard.machine_id"
APPLY_CONTENT_TYPE = "application/apply-patch+yaml"
USER_AGENT = "lanyard.machine_id"
AGGREGATED_DISCOVERY = ("application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList,"
                        "application/json")


class KubeAPIError(LanyardError):
    """A request the API server answered with an error, or could not be made at all (status None)."""

    def __init__(self, msg, status=None, reason=None, details=None, method=None, path=None):
        super(KubeAPIError, self).__init__(msg)
        self.status = status
        self.reason = reason
        self.status_details = details or {}
        self.method = method
        self.path = path


def _tls_context():
    """urllib3's context without ``VERIFY_X509_STRICT``, which Python 3.13 turns on: it refuses a chain whose
    certificates lack RFC 5280 key identifiers (self-made and older private CAs, the test bed's), which kubectl
    (Go) and every older Python accept. The chain, the signatures, the expiry and the host name are verified as
    before; only that conformance check is dropped, so one controller verifies like the next."""
    ctx = create_urllib3_context()
    ctx.verify_flags &= ~getattr(ssl, "VERIFY_X509_STRICT", 0)
    return ctx


class _TLSAdapter(HTTPAdapter):
    """The session's HTTPS: the TLS context above, and with ``server_name`` (kubeconfig ``tls-server-name``)
    that name sent as SNI and checked against the certificate."""

    def __init__(self, server_name=None, verify=True, **kwargs):
        self._server_name = server_name
        self._verify = verify
        super(_TLSAdapter, self).__init__(**kwargs)

    def _tls_kwargs(self, kwargs):
        if self._verify:  # with verify off requests/urllib3 build their own non-verifying context
            kwargs["ssl_context"] = _tls_context()
        if self._server_name:
            kwargs["server_hostname"] = self._server_name
            kwargs["assert_hostname"] = self._server_name
        return kwargs

    def init_poolmanager(self, connections, maxsize, block=False, **pool_kwargs):
        super(_TLSAdapter, self).init_poolmanager(connections, maxsize, block=block, **self._tls_kwargs(pool_kwargs))

    def proxy_manager_for(self, proxy, **proxy_kwargs):
        return super(_TLSAdapter, self).proxy_manager_for(proxy, **self._tls_kwargs(proxy_kwargs))


def _write_private(directory, name, data):
    path = os.path.join(directory, name)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    return path


class KubeClient(object):
    """``with KubeClient(conn) as api: api.get(path)`` -- one session, temp files removed on exit."""

    def __init__(self, conn, timeout=30, session=None):
        self.conn = conn
        self.timeout = timeout
        self._session = session
        self._own_session = session is None
        self._tmpdir = None

    # -- lifecycle ----------------------------------------------------------------------------------------
    def __enter__(self):
        if self._session is None:
            try:
                self._session = self._build_session()
            except BaseException:
                self.close()  # never leave inline key material behind
                raise
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def close(self):
        if self._own_session and self._session is not None:
            self._session.close()
            self._session = None
        if self._tmpdir:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    @property
    def temp_dir(self):
        return self._tmpdir

    def _private_file(self, name, data):
        if self._tmpdir is None:
            self._tmpdir = tempfile.mkdtemp(prefix="lanyard-kube-")
            os.chmod(self._tmpdir, 0o700)
        return _write_private(self._tmpdir, name, data)

    def _build_session(self):
        if not HAS_REQUESTS:
            raise LanyardError("the Python library 'requests' is missing on the host running this module (%s). "
                               "Fix: install python3-requests there, or run the task with delegate_to: localhost."
                               % REQUESTS_IMPORT_ERROR)
        conn = self.conn
        s = requests.Session()
        s.trust_env = False  # no ~/.netrc credentials; proxies are taken from the environment below
        s.headers["User-Agent"] = USER_AGENT
        s.headers["Accept"] = "application/json"
        if not conn.verify:
            s.verify = False
        elif conn.ca_data:
            s.verify = self._private_file("ca.crt", conn.ca_data)
        elif conn.ca_file:
            if not os.path.exists(conn.ca_file):
                raise LanyardError("CA certificate %s for %s does not exist. Fix ca_cert or the kubeconfig's "
                                   "certificate-authority." % (conn.ca_file, conn.label))
            s.verify = conn.ca_file
        cert = key = None
        if conn.client_cert_data:
            cert = self._private_file("client.crt", conn.client_cert_data)
        elif conn.client_cert_file:
            cert = conn.client_cert_file
        if conn.client_key_data:
            key = self._private_file("client.key", conn.client_key_data)
        elif conn.client_key_file:
            key = conn.client_key_file
        for what, path in (("client certificate", cert), ("client key", key)):
            if path and not os.path.exists(path):
                raise LanyardError("%s %s for %s does not exist. Fix client_cert/client_key or the kubeconfig."
                                   % (what, path, conn.label))
        if cert:
            s.cert = (cert, key)
        if conn.token:
            s.headers["Authorization"] = "Bearer %s" % conn.token
        elif conn.username:
            s.auth = (conn.username, conn.password or "")
        if conn.impersonate_user:
            s.headers["Impersonate-User"] = conn.impersonate_user
        if conn.verify or conn.tls_server_name:
            s.mount("https://", _TLSAdapter(conn.tls_server_name, verify=bool(conn.verify)))
        if conn.proxy_url:  # option proxy / $K8S_AUTH_PROXY, else the kubeconfig's proxy-url
            s.proxies = {"https": conn.proxy_url, "http": conn.proxy_url}
        else:
            s.proxies = get_environ_proxies(conn.server) or {}
        if conn.no_proxy and bypasses_proxy(urlparse(conn.server).hostname, conn.no_proxy):
            s.proxies = {}
        return s

    # -- requests -----------------------------------------------------------------------------------------
    def request(self, method, path, params=None, body=None, content_type="application/json", accept=None):
        url = self.conn.server + path
        headers = {}
        data = None
        if body is not None:
            data = json.dumps(body, sort_keys=True)
            headers["Content-Type"] = content_type
        if accept:
            headers["Accept"] = accept
        if self.conn.impersonate_groups:
            # The API server wants one Impersonate-Group header per group; requests sends one per name.
            if len(self.conn.impersonate_groups) > 1:
                raise LanyardError("the kubeconfig user impersonates several groups (as-groups), which this module "
                                   "does not support. Fix: impersonate at most one group.")
            headers["Impersonate-Group"] = self.conn.impersonate_groups[0]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # InsecureRequestWarning when validate_certs is false
                resp = self._session.request(method, url, params=params, data=data, headers=headers,
                                             timeout=self.timeout)
        except requests.exceptions.ProxyError as exc:
            proxy = (self._session.proxies or {}).get("https", "")
            raise KubeAPIError("the proxy %s failed to connect to %s: %s. Fix: check the proxy option (or "
                               "$K8S_AUTH_PROXY, the kubeconfig's proxy-url, $HTTPS_PROXY), or exempt this server "
                               "with no_proxy." % (_strip_userinfo(proxy), self.conn.label, _short(exc)),
                               method=method, path=path)
        except requests.exceptions.SSLError as exc:
            raise KubeAPIError(
                "TLS with %s failed: %s. Fix: check ca_cert / the kubeconfig's certificate-authority and "
                "tls-server-name, or the client certificate." % (self.conn.label, _short(exc)),
                method=method, path=path)
        except requests.exceptions.Timeout:
            raise KubeAPIError("%s did not answer %s %s within %ss. Fix: check the server address and network, or "
                               "raise request_timeout." % (self.conn.label, method, path, self.timeout),
                               method=method, path=path)
        except requests.exceptions.RequestException as exc:
            raise KubeAPIError("cannot reach %s: %s. Fix: check the server address (%s) and that the API server "
                               "is running." % (self.conn.label, _short(exc), self.conn.source),
                               method=method, path=path)
        if resp.status_code >= 400:
            status = {}
            try:
                status = resp.json()
            except ValueError:
                status = {"message": resp.text[:300]}
            if not isinstance(status, dict):
                status = {"message": str(status)[:300]}
            raise KubeAPIError(status.get("message") or resp.reason or "HTTP %s" % resp.status_code,
                               status=resp.status_code, reason=status.get("reason") or resp.reason,
                               details=status.get("details"), method=method, path=path)
        if not resp.content:
            return {}
        try:
            return resp.json()
        except ValueError:
            raise KubeAPIError("%s answered %s %s with something that is not JSON. Fix: check that %s is a "
                               "Kubernetes API server." % (self.conn.label, method, path, self.conn.server),
                               status=resp.status_code, method=method, path=path)

    def get(self, path):
        """The object at ``path``, or None when it does not exist (404)."""
        try:
            return self.request("GET", path)
        except KubeAPIError as exc:
            if exc.status == 404:
                return None
            raise

    def apply(self, path, obj, force=False, dry_run=False, field_manager=FIELD_MANAGER):
        """Server-side apply ``obj`` (a dict) at ``path``; with ``dry_run`` nothing is persisted."""
        params = {"fieldManager": field_manager, "force": "true" if force else "false"}
        if dry_run:
            params["dryRun"] = "All"
        return self.request("PATCH", path, params=params, body=obj, content_type=APPLY_CONTENT_TYPE)

    def delete(self, path, dry_run=False, uid=None, resource_version=None):
        body = {"apiVersion": "v1", "kind": "DeleteOptions"}
        if uid or resource_version:
            body["preconditions"] = dict((k, v) for k, v in (("uid", uid), ("resourceVersion", resource_version))
                                         if v)
        if dry_run:
            body["dryRun"] = ["All"]
        params = {"dryRun": "All"} if dry_run else None
        return self.request("DELETE", path, params=params, body=body)

    def discovery(self):
        """``{resource plural: [group, ...]}`` for every served resource (core group is "", listed first).

        Uses aggregated discovery (one request per root, Kubernetes 1.26+) and falls back to per-group lists.
        """
        found = {}

        def add(name, group):
            if name and "/" not in name and group not in found.setdefault(name, []):
                found[name].append(group)

        aggregated = True
        for root in ("/api", "/apis"):
            doc = self.request("GET", root, accept=AGGREGATED_DISCOVERY)
            if doc.get("kind") != "APIGroupDiscoveryList":
                aggregated = False
                break
            for item in doc.get("items") or []:
                versions = item.get("versions") or []
                group = (item.get("metadata") or {}).get("name") or ""
                if versions:  # the first version is the preferred one
                    for res in versions[0].get("resources") or []:
                        add(res.get("resource"), group)
        if aggregated:
            return found
        found.clear()
        for res in self.request("GET", "/api/v1").get("resources") or []:
            add(res.get("name"), "")
        for group in self.request("GET", "/apis").get("groups") or []:
            version = (group.get("preferredVersion") or {}).get("groupVersion")
            if not version:
                continue
            try:
                listing = self.request("GET", "/apis/%s" % version)
            except KubeAPIError as exc:
                if exc.status in (404, 503):  # an aggregated API that is down: skip it like kubectl does
                    continue
                raise
            for res in listing.get("resources") or []:
                add(res.get("name"), group["name"])
        return found


def _strip_userinfo(url):
    """A proxy URL without ``user:password@`` (never shown)."""
    parsed = urlparse(url or "")
    if parsed.username or parsed.password:
        return parsed._replace(netloc=parsed.netloc.rsplit("@", 1)[-1]).geturl()
    return url


def _short(exc):
    text = str(exc)
    # urllib3 wraps the interesting part deep inside; keep the last reason, one line, bounded.
    for marker in ("SSLError(", "NewConnectionError(", "Caused by "):
        if marker in text:
            text = text[text.rfind(marker):]
    return " ".join(text.split())[:300]
