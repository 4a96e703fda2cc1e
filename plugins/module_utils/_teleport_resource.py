# -*- coding: utf-8 -*-
# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""PRIVATE to this collection: decisions about Teleport resources (no I/O).

Normalisation and comparison of what the user declared against what the server stores. The server
fills many defaults (a v13 role gets ``options``, ``deny: {}``, ``verbs`` ...); we compare only the
keys the user declared, after bringing both sides to one canonical form:

* Go durations (``8h`` vs ``8h0m0s``) compare as seconds;
* a label value ``"*"`` equals ``["*"]`` (Teleport stores label values as lists);
* ``None``/empty values the user declared equal a missing key on the server;
* dicts compare key by key (only the declared keys), lists element by element and in order.
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


def _empty(value):
    return value is None or value == {} or value == [] or value == ""


def _label_values(value):
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    return [str(value)]


def values_equal(declared, current, key=None):
    """True when ``current`` (server) satisfies ``declared`` (user) under the rules in the module doc."""
    if _empty(declared):
        return _empty(current)
    if key in LABEL_KEYS and isinstance(declared, dict):
        if not isinstance(current, dict) or set(declared) != set(current):
            return False
        return all(sorted(_label_values(declared[k])) == sorted(_label_values(current[k])) for k in declared)
    if isinstance(declared, dict):
        if not isinstance(current, dict):
            return False
        return all(values_equal(v, current.get(k), k) for k, v in declared.items())
    if isinstance(declared, (list, tuple)):
        if not isinstance(current, (list, tuple)) or len(declared) != len(current):
            return False
        return all(values_equal(d, c, key) for d, c in zip(declared, current))
    if isinstance(declared, bool) or isinstance(current, bool):
        return isinstance(declared, bool) and isinstance(current, bool) and declared == current
    dd, cd = parse_duration(declared), parse_duration(current)
    if dd is not None and cd is not None:
        return abs(dd - cd) < 1e-9
    if isinstance(declared, (int, float)) and isinstance(current, (int, float)):
        return declared == current
    return str(declared) == str(current) if isinstance(declared, str) or isinstance(current, str) else declared == current


def overlay(current, declared):
    """What the server would hold after writing ``declared``, as far as declared keys go (for diffs)."""
    if isinstance(declared, dict) and isinstance(current, dict):
        out = copy.deepcopy(current)
        for k, v in declared.items():
            out[k] = overlay(current.get(k), v) if k in current else copy.deepcopy(v)
        return out
    return copy.deepcopy(declared)


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


def role_matches(declared, current):
    """Does the server role ``current`` satisfy the declared role? Version must match exactly."""
    if not current:
        return False
    if str(declared.get("version")) != str(current.get("version")):
        return False
    cmeta = current.get("metadata") or {}
    for key, value in (declared.get("metadata") or {}).items():
        if key != "name" and not values_equal(value, cmeta.get(key), key):
            return False
    return values_equal(declared.get("spec", {}), current.get("spec", {}))


def role_diff(declared, current):
    """(before, after) for --diff: the server role, and it overlaid with the declared keys."""
    before = strip_volatile(current) if current else {}
    after = overlay(before, declared) if current else copy.deepcopy(declared)
    if current:
        after["version"] = declared.get("version")
    return before, after
