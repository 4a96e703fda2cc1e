# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""AuthClient against a stand-in auth server (grpcio, mTLS) that follows Teleport's renewal rules:
generation counter, lock on mismatch, impersonation with role requests, host CA re-read."""

from __future__ import annotations

import datetime as dt
import socket
import time
from concurrent import futures
from types import SimpleNamespace

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from machine_id_agent import identity as ident
from machine_id_agent import proto, renew, webapi
from machine_id_agent.errors import LockedError, RenewError

CLUSTER = "unit-cluster"
NOW = dt.datetime.now(dt.timezone.utc)  # import time: only for the CAs (valid a day); leaves use _now()


def _now():
    """Issue time. Not the import time: the whole suite runs for more than an hour before these tests."""
    return dt.datetime.now(dt.timezone.utc)


OID_KUBE = x509.ObjectIdentifier("1.3.9999.1.3")


class CA:
    def __init__(self, name=CLUSTER):
        self.key = ec.generate_private_key(ec.SECP256R1())
        # Teleport's CAs of one cluster share O and CN and differ in the serialNumber attribute.
        self.name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, name),
                               x509.NameAttribute(NameOID.COMMON_NAME, name),
                               x509.NameAttribute(NameOID.SERIAL_NUMBER, str(x509.random_serial_number()))])
        self.pem = (x509.CertificateBuilder().subject_name(self.name).issuer_name(self.name)
                    .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                    .not_valid_before(NOW - dt.timedelta(hours=1)).not_valid_after(NOW + dt.timedelta(days=1))
                    .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                    .sign(self.key, hashes.SHA256())).public_bytes(serialization.Encoding.PEM)

    def issue(self, pub, attrs, sans=None, hours=1.0) -> bytes:
        b = (x509.CertificateBuilder().subject_name(x509.Name(attrs)).issuer_name(self.name).public_key(pub)
             .serial_number(x509.random_serial_number()).not_valid_before(_now() - dt.timedelta(minutes=1))
             .not_valid_after(_now() + dt.timedelta(hours=hours)))
        if sans:
            b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName(s) for s in sans]), critical=False)
        return b.sign(self.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def bot_attrs(user, generation):
    return [x509.NameAttribute(NameOID.COMMON_NAME, user), x509.NameAttribute(ident.OID_RENEWABLE, "true"),
            x509.NameAttribute(ident.OID_GENERATION, str(generation))]


class FakeAuth:
    """The parts of Teleport's auth gRPC API the agent uses, with v13's renewal rules."""

    def __init__(self, version="13.3.8", impersonate=("kube-role",)):
        self.user_ca, self.host_ca = CA(), CA()
        self.version = version
        self.impersonate = list(impersonate)
        self.generation = {}  # user -> current generation (the bot-generation label)
        self.locked = set()
        self.requests = []
        self.cas = {t: ("", "", "") for t in ("host", "user")}  # CA type -> rotation (state, phase, id)
        self.watchers = []  # one queue of events per open WatchEvents stream
        self.watch_opens = 0
        self._start()

    def _start(self):
        skey = ec.generate_private_key(ec.SECP256R1())
        scert = self.host_ca.issue(skey.public_key(), [x509.NameAttribute(NameOID.COMMON_NAME, "auth")],
                                   sans=["*.teleport.cluster.local", "teleport.cluster.local"])
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        services = {}
        for m, (req, resp) in proto.SIGNATURES.items():
            service, name = proto.METHODS[m].strip("/").split("/")
            kind = grpc.unary_stream_rpc_method_handler if m == "WatchEvents" else grpc.unary_unary_rpc_method_handler
            services.setdefault(service, {})[name] = kind(getattr(self, m), request_deserializer=req.FromString,
                                                          response_serializer=resp.SerializeToString)
        self.server.add_generic_rpc_handlers(tuple(grpc.method_handlers_generic_handler(svc, handlers)
                                                   for svc, handlers in services.items()))
        creds = grpc.ssl_server_credentials(
            [(skey.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption()), scert)],
            root_certificates=self.user_ca.pem, require_client_auth=True)
        self.port = self.server.add_secure_port("127.0.0.1:0", creds)
        self.addr = f"127.0.0.1:{self.port}"
        self.server.start()

    def stop(self):
        self.server.stop(0)

    def join(self, user="bot-unit") -> ident.Identity:
        key = ident.generate_key()
        pub = serialization.load_pem_private_key(key, None).public_key()
        self.generation[user] = 1
        return ident.Identity(key_pem=key, tls_cert_pem=self.user_ca.issue(pub, bot_attrs(user, 1)),
                              ssh_cert=b"ssh-rsa-cert-v01@openssh.com AAAA\n",
                              tls_ca_pems=[self.user_ca.pem, self.host_ca.pem], ssh_ca_lines=[])

    # -- RPCs --------------------------------------------------------------------------------------
    @staticmethod
    def _peer(context) -> x509.Certificate:
        return x509.load_pem_x509_certificate(context.auth_context()["x509_pem_cert"][0])

    def Ping(self, request, context):
        return proto.PingResponse(cluster_name=CLUSTER, server_version=self.version, proxy_public_addr="proxy:443")

    def GetClusterCACert(self, request, context):
        return proto.GetClusterCACertResponse(tls_ca=self.host_ca.pem)

    # -- CA rotations (WatchEvents and TrustService.GetCertAuthority, as v13 serves them to a bot)
    def _ca(self, ca_type):
        ca = proto.CertAuthorityV2(kind="cert_authority")
        ca.spec.type, ca.spec.cluster_name = ca_type, CLUSTER
        state, phase, rid = self.cas[ca_type]
        if state:
            ca.spec.rotation.state, ca.spec.rotation.phase, ca.spec.rotation.current_id = state, phase, rid
            ca.spec.rotation.mode = "manual"
        return ca

    def GetCertAuthority(self, request, context):
        return self._ca(request.type)

    def WatchEvents(self, request, context):
        import queue

        self.watch_opens += 1
        self.watch_requests = getattr(self, "watch_requests", []) + [request]
        q = queue.Queue()
        self.watchers.append(q)
        try:
            yield proto.Event(type=proto.EVENT_INIT)
            while context.is_active():
                try:
                    ev = q.get(timeout=0.1)
                except queue.Empty:
                    continue
                if ev is None:  # the server drops the stream (as Teleport does when it reloads)
                    context.abort(grpc.StatusCode.UNAVAILABLE, "server is shutting down")
                yield ev
        finally:
            self.watchers.remove(q)

    def rotate(self, ca_type, phase, rid="rot-1", notify=True):
        """Move a CA to ``phase`` ("" = back to standby after a finished rotation) and tell the watchers."""
        self.cas[ca_type] = ("in_progress", phase, rid) if phase not in ("", "standby") else ("standby", "standby",
                                                                                              rid)
        if notify:
            ev = proto.Event(type=proto.EVENT_PUT)
            ev.cert_authority.CopyFrom(self._ca(ca_type))
            for q in list(self.watchers):
                q.put(ev)

    def drop_watchers(self):
        for q in list(self.watchers):
            q.put(None)

    def ListResources(self, request, context):
        """v13: kube_server items of the clusters the caller's roles may access; the bot's own (renewable)
        certificate has no role with kubernetes_labels, so it sees none. Pages of ``limit`` items."""
        self.list_requests = getattr(self, "list_requests", []) + [request]
        peer = self._peer(context)
        if peer.subject.get_attributes_for_oid(ident.OID_RENEWABLE):
            visible = []
        else:
            visible = sorted(getattr(self, "kube", {}).items())
        start = int(request.start_key or 0)
        page = visible[start:start + (request.limit or 1000)]
        resp = proto.ListResourcesResponse()
        for name, (labels, dynamic) in page:
            for _server in range(2):  # two kube_services serve each cluster: it must appear once
                item = resp.resources.add()
                cl = item.kubernetes_server.spec.cluster
                cl.kind = "kube_cluster"
                cl.metadata.name = name
                for k, v in labels.items():
                    cl.metadata.labels.add(key=k, value=v)
                for k, v in dynamic.items():
                    e = cl.spec.dynamic_labels.add(key=k)
                    e.value.result = v
        if start + len(page) < len(visible):
            resp.next_key = str(start + len(page))
        return resp

    def GetRole(self, request, context):
        role = proto.RoleV6(kind="role")
        role.spec.allow.impersonate.roles.extend(self.impersonate)
        return role

    def GetUser(self, request, context):
        """v13: a user may read itself; the bot's generation is the label teleport.internal/bot-generation."""
        peer = self._peer(context).subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
        if request.name != peer:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "access denied to perform action \"read\" on \"user\"")
        user = proto.UserV2(kind="user")
        user.metadata.name = request.name
        if request.name in self.generation:
            lagging = time.monotonic() < getattr(self, "lag_until", float("inf"))
            shown = self.generation[request.name] - (getattr(self, "label_lag", 0) if lagging else 0)  # read cache
            user.metadata.labels.add(key=proto.BOT_GENERATION_LABEL, value=str(shown))
        return user

    def GenerateUserCerts(self, request, context):
        self.requests.append(request)
        peer = self._peer(context)
        user = peer.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
        if user in self.locked:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "access denied")
        if int(self.version.split(".")[0]) >= 17:
            pub = serialization.load_pem_public_key(request.tls_public_key)
        else:
            pub = serialization.load_ssh_public_key(request.public_key.strip())
        if request.use_role_requests:
            attrs = [x509.NameAttribute(NameOID.COMMON_NAME, user)]
            attrs += [x509.NameAttribute(NameOID.ORGANIZATION_NAME, r) for r in request.role_requests]
            if request.kubernetes_cluster:
                attrs.append(x509.NameAttribute(OID_KUBE, request.kubernetes_cluster))
            tls = self.user_ca.issue(pub, attrs, hours=0.2)
            return proto.Certs(tls=tls, ssh=b"ssh-cert", tls_ca_certs=[self.user_ca.pem])
        presented = int(peer.subject.get_attributes_for_oid(ident.OID_GENERATION)[0].value)
        if presented != self.generation[user]:
            self.locked.add(user)
            context.abort(grpc.StatusCode.PERMISSION_DENIED,
                          f"renewable cert generation mismatch: stored={self.generation[user]}, presented={presented}")
        self.generation[user] += 1
        tls = self.user_ca.issue(pub, bot_attrs(user, self.generation[user]))
        return proto.Certs(tls=tls, ssh=b"ssh-rsa-cert-v01@openssh.com BBBB",
                           tls_ca_certs=[self.user_ca.pem, self.host_ca.pem], ssh_ca_certs=[b"@cert-authority x"])


@pytest.fixture
def auth():
    a = FakeAuth()
    yield a
    a.stop()


def cfg(tmp_path, auth, **kw):
    d = dict(auth_server=auth.addr, proxy_server=None, storage_dir=tmp_path / "bot", ca_path=None, insecure=False)
    d.update(kw)
    d["storage_dir"].mkdir(mode=0o700, parents=True, exist_ok=True)  # `init` made it before any renewal
    return SimpleNamespace(**d)


def direct_cfg(tmp_path, auth):
    renew._proxy_cache[auth.addr] = False  # no /webapi probe against the gRPC stand-in
    return cfg(tmp_path, auth)


def test_renewals_increment_generation_and_store_first(tmp_path, auth):
    c = direct_cfg(tmp_path, auth)
    idt = auth.join()
    ident.store(c.storage_dir, idt, ident.token_hash("t"))
    keys = {idt.key_pem}
    for expected in (2, 3, 4):
        with renew.AuthClient(c, idt) as client:
            assert client.route == ("auth", auth.addr)
            idt = client.renew_identity(3600)
        assert idt.generation == expected
        on_disk = ident.load(c.storage_dir)
        assert on_disk.generation == expected and on_disk.key_pem == idt.key_pem
        keys.add(idt.key_pem)
    assert len(keys) == 4  # a fresh key at every renewal
    assert ident.stored_token_hash(c.storage_dir) == ident.token_hash("t")  # kept across renewals
    req = auth.requests[-1]
    assert req.username == "bot-unit" and req.public_key.startswith(b"ssh-rsa ")
    assert not req.use_role_requests and not req.role_requests and not req.kubernetes_cluster
    assert not req.tls_public_key  # v13: field 1 only
    assert abs(req.expires.seconds - (dt.datetime.now(dt.timezone.utc).timestamp() + 3600)) < 60


def test_stale_generation_is_locked_error(tmp_path, auth):
    c = direct_cfg(tmp_path, auth)
    stale = auth.join()
    with renew.AuthClient(c, stale) as client:
        client.renew_identity(3600)
    with pytest.raises(LockedError) as err:
        with renew.AuthClient(c, stale) as client:
            # without the generation check (the race it cannot close: another agent renewing in between)
            client.renew_identity(3600, check_generation=False)
    e = err.value
    assert not e.retryable and "stored=2, presented=1" in str(e) and "tctl get locks" in str(e)
    assert "\n" not in str(e)
    # The refused identity is never presented again (each attempt would lock the bot anew).
    n = len(auth.requests)
    auth.locked.clear()  # even after an admin removed the lock
    with pytest.raises(LockedError, match="never presented again"):
        with renew.AuthClient(c, stale) as client:
            client.renew_identity(3600)
    assert len(auth.requests) == n
    auth.locked.add("bot-unit")
    # Afterwards even the newest identity is refused; the message points at locks.
    with pytest.raises(RenewError) as err:
        with renew.AuthClient(c, ident.load(c.storage_dir)) as client:
            client.renew_identity(3600)
    assert not err.value.retryable and "locked" in str(err.value)


def test_lost_renewal_is_detected_and_never_presented(tmp_path, auth):
    """A renewal the server counted but the disk never got (the agent killed in between): the bot's generation
    label (GetUser on itself) is ahead of the stored identity, so the identity is not presented (that would lock
    the bot); the error says the host needs re-enrolment, and the identity still serves Kubernetes certificates
    until it expires."""
    c = direct_cfg(tmp_path, auth)
    first = auth.join()
    with renew.AuthClient(c, first) as client:
        client.renew_identity(3600)  # generation 2 counted ...
    ident.store(c.storage_dir, first)  # ... and "lost": the disk holds generation 1 again
    n = len(auth.requests)
    with pytest.raises(LockedError) as err:
        with renew.AuthClient(c, ident.load(c.storage_dir)) as client:
            client.renew_identity(3600)
    e = err.value
    assert e.details.get("lost_renewal") and not e.retryable
    assert "lost a renewal" in str(e) and "holds generation 1" in str(e) and "counts generation 2" in str(e)
    assert "re-enrol" in str(e) and "\n" not in str(e)
    assert len(auth.requests) == n and not auth.locked, "nothing presented, nothing locked"
    assert ident.stale_reason(c.storage_dir, first) == ident.STALE_LOST
    with pytest.raises(LockedError, match="lost a renewal"):  # remembered: no GetUser needed any more
        with renew.AuthClient(c, ident.load(c.storage_dir)) as client:
            client.renew_identity(3600)
    assert len(auth.requests) == n
    with renew.AuthClient(c, ident.load(c.storage_dir)) as client:
        assert client.kube_credentials("k8s-a", None, 600).cert_pem


def test_a_lagging_server_count_is_not_a_lost_renewal(tmp_path, auth):
    """Teleport's read cache can answer GetUser with the generation before the latest renewal (renewals a second
    apart on the bed): a server count BEHIND the stored identity is not a lost renewal; the newest identity is
    presented and renewed, nothing is marked stale."""
    c = direct_cfg(tmp_path, auth)
    first = auth.join()
    with renew.AuthClient(c, first) as client:
        second = client.renew_identity(3600)
    auth.label_lag = 1  # the server still shows generation 1 while the disk holds 2
    with renew.AuthClient(c, ident.load(c.storage_dir)) as client:
        third = client.renew_identity(3600)
    assert (second.generation, third.generation) == (2, 3)
    assert ident.stale_reason(c.storage_dir, third) is None and not auth.locked


def _cut_off_renewal(tmp_path, c, auth, counted):
    """The state a renewal cut off in flight leaves: the in-flight mark naming the stored identity; the server
    counted the renewal (``counted``) or not; its read cache still shows the old count for 1 s."""
    first = auth.join()
    ident.store(c.storage_dir, first)
    if counted:
        other = cfg(tmp_path, auth, storage_dir=tmp_path / "elsewhere")  # the answer went nowhere
        with renew.AuthClient(other, first) as client:
            client.renew_identity(3600)
    ident.mark_in_flight(c.storage_dir, first)
    auth.label_lag, auth.lag_until = 1, time.monotonic() + 1.0
    return first


def test_cut_off_renewal_that_was_counted_is_never_presented(tmp_path, auth, monkeypatch):
    """Killed between Teleport counting a renewal and the answer reaching the disk, restarted at once: GetUser
    still shows the old count (read cache), so a single read would let the stale identity be presented and lock
    the bot (the CI failure of stop 17). The in-flight mark makes the agent read the count until it settles."""
    monkeypatch.setattr(renew, "IN_DOUBT_SETTLE", 3.0)
    monkeypatch.setattr(renew, "IN_DOUBT_POLL", 0.1)
    c = direct_cfg(tmp_path, auth)
    first = _cut_off_renewal(tmp_path, c, auth, counted=True)
    n = len(auth.requests)
    t0 = time.monotonic()
    with pytest.raises(LockedError) as err:
        with renew.AuthClient(c, ident.load(c.storage_dir)) as client:
            client.renew_identity(3600)
    assert err.value.details.get("lost_renewal") and "counts generation 2" in str(err.value)
    assert 0.9 < time.monotonic() - t0 < 3.0  # found once the cache caught up, before the settle time ran out
    assert len(auth.requests) == n and not auth.locked, "nothing presented, nothing locked"
    assert ident.stale_reason(c.storage_dir, first) == ident.STALE_LOST


def test_without_the_mark_a_lagging_cache_lets_a_stale_identity_lock_the_bot(tmp_path, auth):
    """The control for the test above: the same state without the mark is indistinguishable from a cache lag,
    so the identity is presented and Teleport locks the bot. The mark is what prevents it."""
    c = direct_cfg(tmp_path, auth)
    _cut_off_renewal(tmp_path, c, auth, counted=True)
    ident.clear_in_flight(c.storage_dir)
    with pytest.raises(LockedError, match="generation mismatch"):
        with renew.AuthClient(c, ident.load(c.storage_dir)) as client:
            client.renew_identity(3600)
    assert auth.locked


def test_cut_off_renewal_that_was_not_counted_renews_after_the_settle_time(tmp_path, auth, monkeypatch):
    monkeypatch.setattr(renew, "IN_DOUBT_SETTLE", 1.5)
    monkeypatch.setattr(renew, "IN_DOUBT_POLL", 0.1)
    c = direct_cfg(tmp_path, auth)
    _cut_off_renewal(tmp_path, c, auth, counted=False)
    t0 = time.monotonic()
    with renew.AuthClient(c, ident.load(c.storage_dir)) as client:
        assert client.renew_identity(3600).generation == 2
    assert time.monotonic() - t0 >= 1.5
    assert not (c.storage_dir / ident.IN_FLIGHT_FILE).exists() and not auth.locked


def test_the_settle_time_counts_from_the_first_look_across_restarts(tmp_path, auth, monkeypatch):
    """An agent killed again while it waits for the count to settle does not start the wait over (a crash loop
    shorter than the settle time would never renew again): the mark keeps when the doubt was first noticed."""
    monkeypatch.setattr(renew, "IN_DOUBT_SETTLE", 30.0)
    c = direct_cfg(tmp_path, auth)
    first = _cut_off_renewal(tmp_path, c, auth, counted=False)
    noticed = ident.renewal_in_doubt(c.storage_dir, first)
    assert noticed and abs(ident.renewal_in_doubt(c.storage_dir, first) - noticed) < 0.01  # kept from the first look
    raw = (c.storage_dir / ident.IN_FLIGHT_FILE).read_text().split()
    (c.storage_dir / ident.IN_FLIGHT_FILE).write_text("%s\n%.3f\n" % (raw[0], time.time() - 31))  # 31 s ago
    t0 = time.monotonic()
    with renew.AuthClient(c, ident.load(c.storage_dir)) as client:
        assert client.renew_identity(3600).generation == 2  # one read of the count, no wait
    assert time.monotonic() - t0 < 5 and not auth.locked


def test_in_flight_mark_lifecycle(tmp_path, auth, monkeypatch):
    """A renewal that reached the disk leaves no mark; a mark naming an older certificate (the agent stopped
    between the rename and the removal) is not a doubt; a renewal whose answer never came keeps the mark."""
    monkeypatch.setattr(renew, "IN_DOUBT_SETTLE", 30.0)
    c = direct_cfg(tmp_path, auth)
    first = auth.join()
    ident.store(c.storage_dir, first)
    with renew.AuthClient(c, first) as client:
        second = client.renew_identity(3600)
    assert not (c.storage_dir / ident.IN_FLIGHT_FILE).exists()
    ident.mark_in_flight(c.storage_dir, first)
    assert not ident.renewal_in_doubt(c.storage_dir, second) and ident.renewal_in_doubt(c.storage_dir, first)
    t0 = time.monotonic()
    with renew.AuthClient(c, second) as client:
        assert client.renew_identity(3600).generation == 3
    assert time.monotonic() - t0 < 10  # no settle wait for a mark naming another certificate
    third = ident.load(c.storage_dir)

    def dropped(*a, **kw):
        raise RenewError("renew bot 'unit': connection reset", retryable=True)

    with renew.AuthClient(c, third) as client:
        monkeypatch.setattr(client, "_call", lambda method, req, what: dropped() if method == "GenerateUserCerts"
                            else renew.AuthClient._call(client, method, req, what))
        with pytest.raises(RenewError, match="connection reset"):
            client.renew_identity(3600)
    assert ident.renewal_in_doubt(c.storage_dir, third)


def test_renewal_timings_and_storage_refused_before_the_call(tmp_path, auth, monkeypatch):
    c = direct_cfg(tmp_path, auth)
    with renew.AuthClient(c, auth.join()) as client:
        client.renew_identity(3600)
        t = client.timings
        assert t["rpc"] > 0 and 0 <= t["visible"] <= t["durable"]
    n = len(auth.requests)
    monkeypatch.setattr(ident, "MIN_FREE_BYTES", 1 << 62)  # "the disk is full"
    with pytest.raises(ident.StorageError, match="free space"):
        with renew.AuthClient(c, ident.load(c.storage_dir)) as client:
            client.renew_identity(3600)
    assert len(auth.requests) == n, "nothing asked of the server"


def test_a_storage_that_vanished_for_a_moment_never_loses_the_token_hash(tmp_path, auth):
    """Seen on the real bed: the storage directory swapped away between loading the identity and renewing it
    made the renewal store the new identity without its token hash; every later cycle then took the configured
    (spent) token for a new one. The hash must be read for sure, or nothing is asked."""
    c = direct_cfg(tmp_path, auth)
    idt = auth.join()
    ident.store(c.storage_dir, idt, ident.token_hash("t"))
    n = len(auth.requests)
    moved = tmp_path / "moved"
    c.storage_dir.rename(moved)  # the directory is gone at the moment the renewal reads the hash
    with pytest.raises(ident.StorageError, match="is gone; nothing was asked"):
        with renew.AuthClient(c, idt) as client:
            client.renew_identity(3600)
    assert len(auth.requests) == n, "nothing asked of the server"
    moved.rename(c.storage_dir)
    with renew.AuthClient(c, idt) as client:
        client.renew_identity(3600)
    assert ident.stored_token_hash(c.storage_dir) == ident.token_hash("t")


def test_kube_credentials_default_roles_and_host_ca(tmp_path, auth):
    c = direct_cfg(tmp_path, auth)
    idt = auth.join()
    with renew.AuthClient(c, idt) as client:
        creds = client.kube_credentials("k8s-a", None, 600)
        assert creds.roles == ["kube-role"]
        req = auth.requests[-1]
        assert list(req.role_requests) == ["kube-role"] and req.use_role_requests
        assert req.kubernetes_cluster == "k8s-a" and req.route_to_cluster == CLUSTER
        assert creds.host_ca_pems == [auth.host_ca.pem]
        assert creds.key_pem != idt.key_pem and ident.cert_key_matches(creds.cert_pem, creds.key_pem)
        cert = x509.load_pem_x509_certificate(creds.cert_pem)
        assert cert.subject.get_attributes_for_oid(OID_KUBE)[0].value == "k8s-a"
        assert creds.not_after == ident.cert_not_after(cert)
        # explicit roles win over the default
        assert client.kube_credentials("k8s-a", ["other"], 600).roles == ["other"]
        # a host CA rotation is seen at the next read
        auth.host_ca = CA()
        assert client.host_ca_pems() == [auth.host_ca.pem]
    assert auth.generation["bot-unit"] == 1  # impersonation never touches the generation


def test_no_impersonate_roles_is_not_retryable(tmp_path):
    a = FakeAuth(impersonate=())
    try:
        renew._proxy_cache[a.addr] = False
        with renew.AuthClient(cfg(tmp_path, a), a.join()) as client:
            with pytest.raises(RenewError) as err:
                client.kube_credentials("k8s", None, 600)
        assert not err.value.retryable and "impersonate" in str(err.value)
    finally:
        a.stop()


def test_v17_server_gets_fields_22_and_23(tmp_path):
    a = FakeAuth(version="17.0.2")
    try:
        renew._proxy_cache[a.addr] = False
        with renew.AuthClient(cfg(tmp_path, a), a.join()) as client:
            assert client.server_major == 17  # from Ping, as no proxy facts were given
            assert client.proxy_public_addr() == "proxy:443"
            idt = client.renew_identity(3600)
        req = a.requests[-1]
        assert not req.public_key and req.ssh_public_key.startswith(b"ssh-rsa ")
        assert req.tls_public_key.startswith(b"-----BEGIN PUBLIC KEY-----")
        assert idt.generation == 2
    finally:
        a.stop()


def test_route_through_proxy_bridge(tmp_path, auth):
    """With proxy facts the client goes through the ALPN bridge (here straight to the stand-in)."""
    facts = webapi.ProxyFacts(cluster_name=CLUSTER, server_version="13.3.8", tls_routing=True, kube_public_addr=None,
                              kube_listen_addr=None, web_addr=auth.addr, tunnel_addr=auth.addr)
    c = cfg(tmp_path, auth, auth_server=None, proxy_server=auth.addr)
    with renew.AuthClient(c, auth.join(), facts) as client:
        assert client.route == ("proxy", auth.addr)
        assert client.renew_identity(3600).generation == 2
        assert client.host_ca_pems() == [auth.host_ca.pem]


def test_expired_identity_fails_before_the_network(tmp_path, auth):
    key = ident.generate_key()
    pub = serialization.load_pem_private_key(key, None).public_key()
    old = ident.Identity(key_pem=key, tls_cert_pem=auth.user_ca.issue(pub, bot_attrs("bot-unit", 1), hours=-0.01),
                         ssh_cert=b"x\n", tls_ca_pems=[auth.host_ca.pem], ssh_ca_lines=[])
    with renew.AuthClient(direct_cfg(tmp_path, auth), old) as client:
        with pytest.raises(RenewError) as err:
            client.renew_identity(3600)
    assert not err.value.retryable and "expired" in str(err.value) and "tctl bots add" in str(err.value)
    assert auth.requests == []


def test_unreachable_auth_is_retryable(tmp_path, auth):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dead = f"127.0.0.1:{port}"
    renew._proxy_cache[dead] = False
    c = cfg(tmp_path, auth, auth_server=dead)
    old_timeout, renew.RPC_TIMEOUT = renew.RPC_TIMEOUT, 3
    try:
        with renew.AuthClient(c, auth.join()) as client:
            with pytest.raises(RenewError) as err:
                client.renew_identity(3600)
    finally:
        renew.RPC_TIMEOUT = old_timeout
    assert err.value.retryable and "cannot reach" in str(err.value)


def test_unknown_kube_cluster_is_not_retryable(tmp_path):
    class Picky(FakeAuth):
        def GenerateUserCerts(self, request, context):
            if request.kubernetes_cluster == "nope":
                context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                              'kubernetes cluster "nope" is not registered in this teleport cluster')
            return super().GenerateUserCerts(request, context)

    a = Picky()
    try:
        renew._proxy_cache[a.addr] = False
        with renew.AuthClient(cfg(tmp_path, a), a.join()) as client:
            with pytest.raises(RenewError) as err:
                client.kube_credentials("nope", ["r"], 600)
        assert not err.value.retryable and "tctl kube ls" in str(err.value) and "not registered" in str(err.value)
    finally:
        a.stop()


def test_proxy_without_alpn_route_says_to_use_auth_server(tmp_path, auth):
    """A proxy whose web port drops the teleport-auth@ handshake (e.g. behind an L7 load balancer): a
    retryable error that names the handshake and the fix (auth_server = the auth service); there is no
    other transport to fall back to."""
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(8)
    stop = []

    def drop():
        while not stop:
            try:
                c = lsock.accept()[0]
            except OSError:
                return
            c.recv(4096)
            c.close()  # like a listener with no route for this ALPN

    import threading

    threading.Thread(target=drop, daemon=True).start()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_tunnel = f"127.0.0.1:{s.getsockname()[1]}"
    web = f"127.0.0.1:{lsock.getsockname()[1]}"
    facts = webapi.ProxyFacts(cluster_name=CLUSTER, server_version="13.3.8", tls_routing=False,
                              kube_public_addr="k:3026", kube_listen_addr=None, web_addr=web, tunnel_addr=dead_tunnel)
    c = cfg(tmp_path, auth, auth_server=None, proxy_server=web)
    try:
        with renew.AuthClient(c, auth.join(), facts) as client:
            with pytest.raises(RenewError) as err:
                client.renew_identity(3600)
        msg = str(err.value)
        assert "closed the connection during the TLS handshake" in msg and web in msg, msg
        assert "set auth_server to the auth service address" in msg and err.value.retryable, msg
        assert "\n" not in msg
    finally:
        stop.append(1)
        lsock.close()
    assert auth.requests == []


def test_kube_clusters_lists_with_an_impersonated_certificate_and_pages(tmp_path, auth):
    c = direct_cfg(tmp_path, auth)
    idt = auth.join()
    auth.kube = {"k-%03d" % i: ({"env": "a" if i % 2 else "b"}, {"up": "yes"} if i == 3 else {})
                 for i in range(150)}
    with renew.AuthClient(c, idt) as client:
        found = client.kube_clusters(None, 3600)
        assert len(found) == 150
        assert found["k-001"] == {"env": "a"} and found["k-003"] == {"env": "a", "up": "yes"}
        # the listing certificate: the output's roles, no cluster, short-lived; asked on the bot connection
        req = [r for r in auth.requests if r.use_role_requests][-1]
        assert list(req.role_requests) == ["kube-role"] and not req.kubernetes_cluster
        assert req.expires.seconds - dt.datetime.now(dt.timezone.utc).timestamp() <= 601
        assert [r.start_key for r in auth.list_requests] == ["", "100"]
        assert all(r.resource_type == "kube_server" for r in auth.list_requests)
        creds = client.kube_credentials_for(["k-001", "k-003"], ["other"], 600)
        assert sorted(creds) == ["k-001", "k-003"]
        for name, cr in creds.items():
            cert = x509.load_pem_x509_certificate(cr.cert_pem)
            assert cert.subject.get_attributes_for_oid(OID_KUBE)[0].value == name and cr.roles == ["other"]
            assert ident.cert_key_matches(cr.cert_pem, cr.key_pem)
        assert creds["k-001"].key_pem != creds["k-003"].key_pem
    assert auth.generation["bot-unit"] == 1


def test_kube_clusters_none_visible(tmp_path, auth):
    c = direct_cfg(tmp_path, auth)
    with renew.AuthClient(c, auth.join()) as client:
        assert client.kube_clusters(["kube-role"], 600) == {}
