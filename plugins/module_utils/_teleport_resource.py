# -*- coding: utf-8 -*-
# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""PRIVATE to this collection: decisions about Teleport resources (no I/O).

A role is desired state: the declared role is the whole role. Teleport fills defaults into every role
it stores (v13.3.8, ``RoleV6.CheckAndSetDefaults``: the options below, ``deny: {}``, and for v3-v5 roles
some label and ``kubernetes_resources`` defaults), and prints some values in its own form. So both the
declared role and the stored role are brought to one canonical form, the form ``tctl get --format=json``
prints, and compared whole:

* empty values (null, ``{}``, ``[]``, ``""``) are dropped, as Go's ``omitempty`` does;
* missing options get Teleport's defaults (:data:`ROLE_OPTION_DEFAULTS`), on both sides;
* durations (``8h``) take Go's form (``8h0m0s``);
* a label value list of one element is printed as a plain string (``"*"`` == ``["*"]``);
* server-owned metadata (``id``, ``revision``, ``namespace``) is left out.

What remains on the server and not in the declared role is a difference, so removing a key from the task
removes it from the server at the next write. The canonical forms are also the two sides of ``--diff``.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import copy
import re

from ansible_collections.lanyard.machine_id.plugins.module_utils._errors import LanyardError

_DURATION_RE = re.compile(r"^(?:(\d+(?:\.\d+)?)(ns|us|\u00b5s|ms|s|m|h))+$")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ns|us|\u00b5s|ms|s|m|h)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "\u00b5s": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}

# Keys whose value is a label map: {key: value | [values]}.
LABEL_KEYS = frozenset([
    "node_labels", "app_labels", "kubernetes_labels", "db_labels", "windows_desktop_labels", "cluster_labels",
    "db_service_labels", "group_labels", "labels",
])
# Metadata keys the server owns.
VOLATILE_METADATA = ("id", "revision", "resource_id", "namespace")


def parse_duration(value):
    """Go duration string -> seconds (float); None when it is not a duration."""
    if not isinstance(value, str) or not value or not _DURATION_RE.match(value):
        return None
    return sum(float(n) * _UNITS[u] for n, u in _DURATION_PART.findall(value))


def format_duration(seconds):
    """Seconds -> the compact Go-style form (``1h30m``), for messages and diffs."""
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    out = ""
    if h:
        out += "%dh" % h
    if m:
        out += "%dm" % m
    if s or not out:
        out += "%ds" % s
    return out


def strip_volatile(resource):
    """A copy of a server resource without server-owned metadata (for diffs and return values)."""
    res = copy.deepcopy(resource or {})
    meta = res.get("metadata")
    if isinstance(meta, dict):
        for k in VOLATILE_METADATA:
            meta.pop(k, None)
    res.pop("status", None)
    return res


def build_role(name, spec=None, resource=None, version="v6", labels=None, description=None):
    """The role resource the user declared (``spec`` form or full ``resource`` form)."""
    if resource is not None:
        if not isinstance(resource, dict):
            raise LanyardError("role %s: resource must be a dict (a Teleport role as in role.yaml)." % name)
        res = copy.deepcopy(resource)
        kind = res.get("kind", "role")
        if kind != "role":
            raise LanyardError("role %s: resource has kind %r, expected 'role'. Fix: pass a Teleport role resource."
                               % (name, kind))
        res["kind"] = "role"
        meta = res.setdefault("metadata", {})
        if meta.get("name") not in (None, name):
            raise LanyardError("role %s: resource.metadata.name is %r. Fix: make it equal to name, or leave it out."
                               % (name, meta.get("name")))
        meta["name"] = name
        res.setdefault("version", version)
        if not isinstance(res.get("spec"), dict):
            raise LanyardError("role %s: resource has no spec. Fix: add spec.allow / spec.deny / spec.options." % name)
    else:
        if not isinstance(spec, dict):
            raise LanyardError("role %s: spec must be a dict with allow/deny/options. Fix: set spec or resource." % name)
        res = {"kind": "role", "version": version, "metadata": {"name": name}, "spec": copy.deepcopy(spec)}
    if labels:
        res["metadata"]["labels"] = dict(labels)
    if description is not None:
        res["metadata"]["description"] = description
    unknown = set(res["spec"]) - set(["allow", "deny", "options"])
    if unknown:
        raise LanyardError("role %s: unknown spec key(s) %s. Fix: a role spec has only allow, deny and options."
                           % (name, ", ".join(sorted(unknown))))
    return res


# -- the canonical (server-printed) form of a role -------------------------------------------------------------
# Options Teleport v13.3.8 stores in every role that does not set them, as `tctl get role/x --format=json`
# prints them (observed on the test bed for v3, v4, v5 and v6 roles created with an empty spec; see
# docs/teleport-modules.md). ``max_session_ttl`` also takes its default when it is zero or negative. An
# option given as an empty dict (``record_session: {}``, ``idp: {}``) is stored as nulls and printed as
# ``{"desktop": null}`` / ``{"saml": null}``; both sides then read as "not set".
ROLE_OPTION_DEFAULTS = {
    "forward_agent": False,
    "max_session_ttl": "30h0m0s",
    "port_forwarding": True,
    "cert_format": "standard",
    "enhanced_recording": ["command", "network"],
    "record_session": {"desktop": True, "default": "best_effort"},
    "desktop_clipboard": True,
    "desktop_directory_sharing": True,
    "pin_source_ip": False,
    "ssh_file_copy": True,
    "idp": {"saml": {"enabled": True}},
    "create_desktop_user": False,
    "create_db_user": False,
}
# Keys holding a Go duration (role options; ``request.max_duration`` in conditions).
DURATION_KEYS = frozenset(["max_session_ttl", "client_idle_timeout", "max_duration"])
WILDCARD_POD = {"kind": "pod", "namespace": "*", "name": "*"}


def go_duration(seconds):
    """Seconds -> Go's ``time.Duration.String()`` form (``30h0m0s``, ``1m30s``, ``1.5s``, ``500ms``)."""
    ns = int(round(seconds * 1e9))
    if ns == 0:
        return "0s"
    sign = "-" if ns < 0 else ""
    ns = abs(ns)

    def frac(value, unit_ns):
        whole, rest = divmod(value, unit_ns)
        if not rest:
            return str(whole)
        digits = len(str(unit_ns)) - 1
        return ("%d.%0*d" % (whole, digits, rest)).rstrip("0")

    if ns < 1000:
        return "%s%dns" % (sign, ns)
    if ns < 1000000:
        return "%s%s\u00b5s" % (sign, frac(ns, 1000))
    if ns < 1000000000:
        return "%s%sms" % (sign, frac(ns, 1000000))
    total_s, sub = divmod(ns, 1000000000)
    h, rest = divmod(total_s, 3600)
    m, s = divmod(rest, 60)
    sec = frac(s * 1000000000 + sub, 1000000000) + "s"
    if h:
        return "%s%dh%dm%s" % (sign, h, m, sec)
    if m:
        return "%s%dm%s" % (sign, m, sec)
    return sign + sec


def _is_empty(value):
    return value is None or (isinstance(value, (dict, list, tuple, str)) and len(value) == 0)


def _label_form(value):
    """A label value as Teleport prints it: one value -> a string, several -> a list."""
    values = [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]
    return values[0] if len(values) == 1 else values


def _canon(value, key=None):
    """Drop empties recursively; durations and label values in the printed form."""
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            k = str(k)
            if k in LABEL_KEYS and isinstance(v, dict):
                v = dict((str(lk), _label_form(lv)) for lk, lv in v.items() if not _is_empty(lv))
            else:
                v = _canon(v, k)
            if not _is_empty(v):
                out[k] = v
        return out
    if isinstance(value, (list, tuple)):
        items = [_canon(v, key) for v in value]
        return [v for v in items if not _is_empty(v)]
    if key in DURATION_KEYS and isinstance(value, str):
        seconds = parse_duration(value)
        if seconds is not None:
            return go_duration(seconds)
    return value


def _fill_role_defaults(version, spec):
    options = spec.setdefault("options", {})
    for k, v in ROLE_OPTION_DEFAULTS.items():
        if k not in options:
            options[k] = copy.deepcopy(v)
    ttl = parse_duration(options.get("max_session_ttl"))
    if ttl is not None and ttl <= 0:
        options["max_session_ttl"] = ROLE_OPTION_DEFAULTS["max_session_ttl"]
    allow = spec.get("allow") or {}
    if version == "v3":
        if "node_labels" not in allow and allow.get("logins"):
            allow["node_labels"] = {"*": "*"}
        for k in ("app_labels", "kubernetes_labels", "db_labels"):
            allow.setdefault(k, {"*": "*"})
    if version in ("v3", "v4", "v5") and allow.get("kubernetes_labels") and not allow.get("kubernetes_resources"):
        allow["kubernetes_resources"] = [dict(WILDCARD_POD)]
    if allow:
        spec["allow"] = allow


def canonical_role(resource):
    """The role as ``tctl get`` prints it once stored (see the module doc); {} for None."""
    if not resource:
        return {}
    res = strip_volatile(resource)
    version = str(res.get("version") or "v6")
    meta = res.get("metadata") or {}
    out = {"kind": "role", "version": version, "metadata": {"name": meta.get("name")}}
    if meta.get("labels"):
        out["metadata"]["labels"] = dict((str(k), str(v)) for k, v in meta["labels"].items())
    for key in sorted(meta):
        if key not in ("name", "labels") and not _is_empty(meta[key]):
            out["metadata"][key] = copy.deepcopy(meta[key])
    spec = _canon(res.get("spec") or {})
    for cond in ("allow", "deny"):
        # ``namespaces`` is not read from a resource and never printed (json:"-" in Teleport's RoleConditions)
        if isinstance(spec.get(cond), dict):
            spec[cond].pop("namespaces", None)
            if not spec[cond]:
                del spec[cond]
    _fill_role_defaults(version, spec)
    out["spec"] = spec
    return out


def role_matches(declared, current):
    """Is the server role ``current`` exactly the declared role (after Teleport's defaults)?"""
    return bool(current) and canonical_role(current) == canonical_role(declared)


def role_diff(declared, current):
    """(before, after) for --diff: the server role and the role the write leaves on the server."""
    return canonical_role(current), canonical_role(declared)


def changed_paths(before, after, prefix="", depth=3):
    """Dotted paths (down to ``depth`` levels) where ``after`` differs from ``before``, as "path (how)"."""
    out = []
    keys = sorted(set(before or {}) | set(after or {}))
    for k in keys:
        path = "%s.%s" % (prefix, k) if prefix else k
        b, a = (before or {}).get(k), (after or {}).get(k)
        if b == a:
            continue
        if b is None:
            out.append("%s (added)" % path)
        elif a is None:
            out.append("%s (removed)" % path)
        elif isinstance(b, dict) and isinstance(a, dict) and depth > 1:
            out.extend(changed_paths(b, a, path, depth - 1))
        else:
            out.append("%s (changed)" % path)
    return out
