# -*- coding: utf-8 -*-
# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The few Teleport protobuf messages the agent uses, built at runtime.

No generated code: one hand-written ``FileDescriptorProto`` holds only the fields the agent reads or
writes, with the field numbers of Teleport's ``legacy/client/proto/authservice.proto``,
``certs.proto`` and ``types/types.proto``. Unknown fields in responses are skipped by protobuf, so
the messages stay wire compatible with the full upstream ones. Message names live in a private
package (``lanyard.tp``) inside a private descriptor pool; only the gRPC *method paths* must match
upstream, and those are spelled out in :data:`METHODS`.

Field numbers (upstream name = number):

* ``proto.UserCertsRequest``: PublicKey=1, Username=2, Expires=3 (google.protobuf.Timestamp),
  RouteToCluster=5, KubernetesCluster=7, RoleRequests=12, UseRoleRequests=14, and on v17+
  SSHPublicKey=22, TLSPublicKey=23.
* ``proto.Certs``: SSH=1, TLS=2, TLSCACerts=3 (repeated), SSHCACerts=4 (repeated).
* ``proto.GetClusterCACertResponse``: TLSCA=1.
* ``proto.PingResponse``: ClusterName=1, ServerVersion=2, ProxyPublicAddr=4.
* ``proto.GetRoleRequest``: Name=1; ``types.RoleV6``: Spec=5 -> RoleSpecV6.Allow=2 ->
  RoleConditions.Impersonate=14 -> ImpersonateConditions.Roles=2.
* CA rotations (checked on the v13 bed, docs/protocol-findings.md section 5): ``proto.Watch``: Kinds=1 ->
  ``types.WatchKind``: Kind=1, Filter=4 (map: CA type -> cluster name); ``proto.Event``: Type=1 (INIT=0,
  PUT=1, DELETE=2), CertAuthority=3 -> ``types.CertAuthorityV2``: Spec=5 -> CertAuthoritySpecV2: Type=1,
  ClusterName=2, Rotation=8 -> ``types.Rotation``: State=1, Phase=2, Mode=3, CurrentID=4.
  ``teleport.trust.v1.GetCertAuthorityRequest``: Type=1, Domain=2 (IncludeKey=3 left false).
* Listing Kubernetes clusters (kubernetes/v2 outputs): ``proto.ListResourcesRequest``: ResourceType=1,
  Namespace=2, Limit=3, StartKey=4; ``proto.ListResourcesResponse``: Resources=1 (``PaginatedResource``),
  NextKey=2; ``PaginatedResource``: KubeCluster=6 (``types.KubernetesClusterV3``), KubernetesServer=7
  (``types.KubernetesServerV3``: Spec=5 -> KubernetesServerSpecV3.Cluster=5); ``types.KubernetesClusterV3``:
  Metadata=4, Spec=5 -> KubernetesClusterSpecV3.DynamicLabels=1 (map to ``types.CommandLabelV2``, Result=3).
"""

from __future__ import annotations

import datetime as _dt
from typing import Optional

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

_PACKAGE = "lanyard.tp"

# gRPC method paths on the auth server (these must equal upstream).
METHODS = {
    "GenerateUserCerts": "/proto.AuthService/GenerateUserCerts",
    "GetClusterCACert": "/proto.AuthService/GetClusterCACert",
    "Ping": "/proto.AuthService/Ping",
    "GetRole": "/proto.AuthService/GetRole",
    "GetUser": "/proto.AuthService/GetUser",
    "WatchEvents": "/proto.AuthService/WatchEvents",
    "GetCertAuthority": "/teleport.trust.v1.TrustService/GetCertAuthority",
    "ListResources": "/proto.AuthService/ListResources",
}

_T = descriptor_pb2.FieldDescriptorProto
_OPT, _REP = _T.LABEL_OPTIONAL, _T.LABEL_REPEATED

# message name -> [(field name, number, type, label, message type name or None)]
_MESSAGES = {
    "Empty": [],
    "Timestamp": [("seconds", 1, _T.TYPE_INT64, _OPT, None), ("nanos", 2, _T.TYPE_INT32, _OPT, None)],
    "UserCertsRequest": [
        ("public_key", 1, _T.TYPE_BYTES, _OPT, None),
        ("username", 2, _T.TYPE_STRING, _OPT, None),
        ("expires", 3, _T.TYPE_MESSAGE, _OPT, "Timestamp"),
        ("route_to_cluster", 5, _T.TYPE_STRING, _OPT, None),
        ("kubernetes_cluster", 7, _T.TYPE_STRING, _OPT, None),
        ("role_requests", 12, _T.TYPE_STRING, _REP, None),
        ("use_role_requests", 14, _T.TYPE_BOOL, _OPT, None),
        ("ssh_public_key", 22, _T.TYPE_BYTES, _OPT, None),
        ("tls_public_key", 23, _T.TYPE_BYTES, _OPT, None),
    ],
    "Certs": [
        ("ssh", 1, _T.TYPE_BYTES, _OPT, None),
        ("tls", 2, _T.TYPE_BYTES, _OPT, None),
        ("tls_ca_certs", 3, _T.TYPE_BYTES, _REP, None),
        ("ssh_ca_certs", 4, _T.TYPE_BYTES, _REP, None),
    ],
    "GetClusterCACertResponse": [("tls_ca", 1, _T.TYPE_BYTES, _OPT, None)],
    "PingRequest": [],
    "PingResponse": [
        ("cluster_name", 1, _T.TYPE_STRING, _OPT, None),
        ("server_version", 2, _T.TYPE_STRING, _OPT, None),
        ("proxy_public_addr", 4, _T.TYPE_STRING, _OPT, None),
    ],
    "GetRoleRequest": [("name", 1, _T.TYPE_STRING, _OPT, None)],
    "ImpersonateConditions": [("users", 1, _T.TYPE_STRING, _REP, None), ("roles", 2, _T.TYPE_STRING, _REP, None)],
    "RoleConditions": [("impersonate", 14, _T.TYPE_MESSAGE, _OPT, "ImpersonateConditions")],
    "RoleSpecV6": [("allow", 2, _T.TYPE_MESSAGE, _OPT, "RoleConditions")],
    "RoleV6": [("kind", 1, _T.TYPE_STRING, _OPT, None), ("spec", 5, _T.TYPE_MESSAGE, _OPT, "RoleSpecV6")],
    # GetUser: proto.GetUserRequest Name=1 (WithSecrets=2 left false); answer types.UserV2 Metadata=4 ->
    # types.Metadata Name=1, Labels=5 (map<string,string>, on the wire a repeated key=1/value=2 entry)
    "GetUserRequest": [("name", 1, _T.TYPE_STRING, _OPT, None)],
    "LabelEntry": [("key", 1, _T.TYPE_STRING, _OPT, None), ("value", 2, _T.TYPE_STRING, _OPT, None)],
    "Metadata": [("name", 1, _T.TYPE_STRING, _OPT, None), ("labels", 5, _T.TYPE_MESSAGE, _REP, "LabelEntry")],
    "UserV2": [("kind", 1, _T.TYPE_STRING, _OPT, None), ("metadata", 4, _T.TYPE_MESSAGE, _OPT, "Metadata")],
    # CA rotations
    "WatchKind": [("kind", 1, _T.TYPE_STRING, _OPT, None), ("filter", 4, _T.TYPE_MESSAGE, _REP, "LabelEntry")],
    "Watch": [("kinds", 1, _T.TYPE_MESSAGE, _REP, "WatchKind")],
    "Rotation": [("state", 1, _T.TYPE_STRING, _OPT, None), ("phase", 2, _T.TYPE_STRING, _OPT, None),
                 ("mode", 3, _T.TYPE_STRING, _OPT, None), ("current_id", 4, _T.TYPE_STRING, _OPT, None)],
    "CertAuthoritySpecV2": [("type", 1, _T.TYPE_STRING, _OPT, None), ("cluster_name", 2, _T.TYPE_STRING, _OPT, None),
                            ("rotation", 8, _T.TYPE_MESSAGE, _OPT, "Rotation")],
    "CertAuthorityV2": [("kind", 1, _T.TYPE_STRING, _OPT, None),
                        ("spec", 5, _T.TYPE_MESSAGE, _OPT, "CertAuthoritySpecV2")],
    "Event": [("type", 1, _T.TYPE_INT32, _OPT, None),
              ("cert_authority", 3, _T.TYPE_MESSAGE, _OPT, "CertAuthorityV2")],
    "GetCertAuthorityRequest": [("type", 1, _T.TYPE_STRING, _OPT, None), ("domain", 2, _T.TYPE_STRING, _OPT, None)],
    # Kubernetes clusters the caller may access (kubernetes/v2 outputs; docs/protocol-findings.md section 10)
    "ListResourcesRequest": [("resource_type", 1, _T.TYPE_STRING, _OPT, None),
                             ("namespace", 2, _T.TYPE_STRING, _OPT, None),
                             ("limit", 3, _T.TYPE_INT32, _OPT, None),
                             ("start_key", 4, _T.TYPE_STRING, _OPT, None)],
    "CommandLabelV2": [("result", 3, _T.TYPE_STRING, _OPT, None)],
    "DynamicLabelEntry": [("key", 1, _T.TYPE_STRING, _OPT, None),
                          ("value", 2, _T.TYPE_MESSAGE, _OPT, "CommandLabelV2")],
    "KubernetesClusterSpecV3": [("dynamic_labels", 1, _T.TYPE_MESSAGE, _REP, "DynamicLabelEntry")],
    "KubernetesClusterV3": [("kind", 1, _T.TYPE_STRING, _OPT, None), ("metadata", 4, _T.TYPE_MESSAGE, _OPT, "Metadata"),
                            ("spec", 5, _T.TYPE_MESSAGE, _OPT, "KubernetesClusterSpecV3")],
    "KubernetesServerSpecV3": [("cluster", 5, _T.TYPE_MESSAGE, _OPT, "KubernetesClusterV3")],
    "KubernetesServerV3": [("kind", 1, _T.TYPE_STRING, _OPT, None),
                           ("spec", 5, _T.TYPE_MESSAGE, _OPT, "KubernetesServerSpecV3")],
    "PaginatedResource": [("kube_cluster", 6, _T.TYPE_MESSAGE, _OPT, "KubernetesClusterV3"),
                          ("kubernetes_server", 7, _T.TYPE_MESSAGE, _OPT, "KubernetesServerV3")],
    "ListResourcesResponse": [("resources", 1, _T.TYPE_MESSAGE, _REP, "PaginatedResource"),
                              ("next_key", 2, _T.TYPE_STRING, _OPT, None)],
}


def _build():
    fdp = descriptor_pb2.FileDescriptorProto(name="lanyard/teleport_subset.proto", package=_PACKAGE,
                                             syntax="proto3")
    for name, fields in _MESSAGES.items():
        msg = fdp.message_type.add(name=name)
        for fname, number, ftype, label, tname in fields:
            f = msg.field.add(name=fname, number=number, type=ftype, label=label)
            if tname:
                f.type_name = f".{_PACKAGE}.{tname}"
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(fdp.SerializeToString())
    get_class = getattr(message_factory, "GetMessageClass", None)  # protobuf >= 4.22
    if get_class is None:  # older protobuf (e.g. Debian 12's python3-protobuf 3.21)
        get_class = message_factory.MessageFactory(pool).GetPrototype
    return {name: get_class(pool.FindMessageTypeByName(f"{_PACKAGE}.{name}")) for name in _MESSAGES}


_CLASSES = _build()
Empty = _CLASSES["Empty"]
Timestamp = _CLASSES["Timestamp"]
UserCertsRequest = _CLASSES["UserCertsRequest"]
Certs = _CLASSES["Certs"]
GetClusterCACertResponse = _CLASSES["GetClusterCACertResponse"]
PingRequest = _CLASSES["PingRequest"]
PingResponse = _CLASSES["PingResponse"]
GetRoleRequest = _CLASSES["GetRoleRequest"]
RoleV6 = _CLASSES["RoleV6"]
GetUserRequest = _CLASSES["GetUserRequest"]
UserV2 = _CLASSES["UserV2"]
Watch = _CLASSES["Watch"]
Event = _CLASSES["Event"]
CertAuthorityV2 = _CLASSES["CertAuthorityV2"]
GetCertAuthorityRequest = _CLASSES["GetCertAuthorityRequest"]
ListResourcesRequest = _CLASSES["ListResourcesRequest"]
ListResourcesResponse = _CLASSES["ListResourcesResponse"]
KubernetesClusterV3 = _CLASSES["KubernetesClusterV3"]
EVENT_INIT, EVENT_PUT, EVENT_DELETE = 0, 1, 2

# request/response types per method
SIGNATURES = {
    "GenerateUserCerts": (UserCertsRequest, Certs),
    "GetClusterCACert": (Empty, GetClusterCACertResponse),
    "Ping": (PingRequest, PingResponse),
    "GetRole": (GetRoleRequest, RoleV6),
    "GetUser": (GetUserRequest, UserV2),
    "WatchEvents": (Watch, Event),
    "GetCertAuthority": (GetCertAuthorityRequest, CertAuthorityV2),
    "ListResources": (ListResourcesRequest, ListResourcesResponse),
}


def kube_clusters(resp: "ListResourcesResponse") -> dict:
    """{cluster name: labels} from a ListResources answer (kube_server items carry their cluster; kube_cluster
    items are the cluster). Labels are the static ones plus each dynamic label's last result, as Teleport's
    role matching sees them; a cluster served by several kube_servers appears once."""
    out = {}
    for item in resp.resources:
        if item.HasField("kubernetes_server"):
            cluster = item.kubernetes_server.spec.cluster
        elif item.HasField("kube_cluster"):
            cluster = item.kube_cluster
        else:
            continue
        name = cluster.metadata.name
        if not name:
            continue
        labels = {e.key: e.value for e in cluster.metadata.labels}
        for e in cluster.spec.dynamic_labels:
            labels[e.key] = e.value.result
        out.setdefault(name, labels)
    return out


def ca_watch(cluster: str, ca_types=("host", "user")) -> "Watch":
    """Watch{cert_authority of these types of this cluster} (the filter maps a CA type to its cluster)."""
    w = Watch()
    k = w.kinds.add(kind="cert_authority")
    for t in ca_types:
        k.filter.add(key=t, value=cluster)
    return w


def timestamp(when: _dt.datetime) -> "Timestamp":
    """A Timestamp message for an aware datetime."""
    if when.tzinfo is None:
        raise ValueError("timestamp needs an aware datetime")
    epoch = when.timestamp()
    seconds = int(epoch // 1)
    return Timestamp(seconds=seconds, nanos=int(round((epoch - seconds) * 1e9)) % 1_000_000_000)


def user_certs_request(*, username: str, expires: _dt.datetime, ssh_public_key: bytes, tls_public_key: bytes,
                       server_major: Optional[int], route_to_cluster: str = "", kubernetes_cluster: str = "",
                       role_requests: Optional[list] = None, use_role_requests: bool = False) -> "UserCertsRequest":
    """Build a UserCertsRequest with the public-key fields the server's major version reads.

    Up to v16 the server reads PublicKey (1, authorized_keys line); from v17 it reads SSHPublicKey (22)
    and TLSPublicKey (23, PEM) and field 1 is deprecated (later reserved), so only one set is sent.
    """
    req = UserCertsRequest(username=username, expires=timestamp(expires))
    if server_major is not None and server_major >= 17:
        req.ssh_public_key = ssh_public_key
        req.tls_public_key = tls_public_key
    else:
        req.public_key = ssh_public_key
    if route_to_cluster:
        req.route_to_cluster = route_to_cluster
    if kubernetes_cluster:
        req.kubernetes_cluster = kubernetes_cluster
    if role_requests:
        req.role_requests.extend(role_requests)
    if use_role_requests:
        req.use_role_requests = True
    return req


def impersonate_roles(role: "RoleV6") -> list:
    """The roles a role may impersonate: Spec.Allow.Impersonate.Roles."""
    return list(role.spec.allow.impersonate.roles)


BOT_GENERATION_LABEL = "teleport.internal/bot-generation"


def user_label(user: "UserV2", name: str) -> Optional[str]:
    """One label of a user (types.Metadata.Labels), or None."""
    for e in user.metadata.labels:
        if e.key == name:
            return e.value
    return None
