# -*- coding: utf-8 -*-
# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""PRIVATE to this collection: bot join tokens (teleport_bot_token, and the token teleport_bot discards).

A bot join token is a provision token (``kind: token``) with ``spec.roles: [Bot]``,
``spec.bot_name`` and ``spec.join_method: token``. Its *name is the secret*. So:

* we generate the name ourselves (``secrets``) and create the resource with ``tctl create -``
  (stdin), never with a flag;
* we find tokens again by listing (``tctl get tokens``) and matching the bot and our labels, never
  with ``tctl get token/<name>``;
* we revoke by re-writing the token on stdin with an expiry in the past, never with
  ``tctl tokens rm <name>``.

``name`` in the module is a *logical* name (for example the inventory host) kept in the label
``lanyard.machine_id/name``; it makes "one pending token per host" idempotent.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import datetime
import secrets

from ansible_collections.lanyard.machine_id.plugins.module_utils._errors import LanyardError
from ansible_collections.lanyard.machine_id.plugins.module_utils._teleport_resource import parse_duration
from ansible_collections.lanyard.machine_id.plugins.module_utils._teleport_wait import DEFAULT_TIMEOUT, wait_for

NAME_LABEL = "lanyard.machine_id/name"
MANAGED_LABEL = "lanyard.machine_id/managed"
MAX_TTL = 7 * 24 * 3600

TOKEN_ARGSPEC = dict(
    bot=dict(type="str", required=True),
    state=dict(type="str", default="present", choices=["present", "absent"]),
    name=dict(type="str"),
    labels=dict(type="dict"),
    ttl=dict(type="str", default="1h"),
    force=dict(type="bool", default=False),
    proxy_addr=dict(type="str"),
)


def utcnow():
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)


def rfc3339(when):
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text):
    """RFC 3339 (as Go prints it, with or without fractions) -> aware datetime; None when empty."""
    if not text:
        return None
    t = str(text).strip().replace("Z", "+00:00")
    if "." in t:  # drop fractions (Go may print up to 9 digits; Python takes 6)
        head, rest = t.split(".", 1)
        tz = ""
        for sep in ("+", "-"):
            if sep in rest:
                tz = sep + rest.split(sep, 1)[1]
                break
        t = head + tz
    try:
        return datetime.datetime.strptime(t[:19], "%Y-%m-%dT%H:%M:%S").replace(
            tzinfo=datetime.timezone.utc) - _offset(t[19:])
    except ValueError:
        return None


def _offset(tz):
    if not tz or tz in ("+00:00", "-00:00"):
        return datetime.timedelta(0)
    sign = 1 if tz[0] == "+" else -1
    hh, mm = tz[1:].split(":")
    return sign * datetime.timedelta(hours=int(hh), minutes=int(mm))


def token_labels(params):
    labels = dict((str(k), str(v)) for k, v in (params.get("labels") or {}).items())
    labels[MANAGED_LABEL] = "true"
    if params.get("name"):
        labels[NAME_LABEL] = params["name"]
    return labels


def ttl_seconds(bot, ttl):
    seconds = parse_duration(ttl)
    if seconds is None or seconds <= 0:
        raise LanyardError("bot token for %s: ttl %r is not a duration. Fix: use a Go duration such as 30m or 1h."
                           % (bot, ttl))
    if seconds > MAX_TTL:
        raise LanyardError("bot token for %s: ttl %s is longer than 168h. Fix: use a shorter ttl; a join token should "
                           "live only until the host joins." % (bot, ttl))
    return int(seconds)


def build_token(bot, labels, expires, value=None):
    """The provision token resource; ``value`` (the secret name) is generated when not given."""
    return {
        "kind": "token",
        "version": "v2",
        "metadata": {"name": value or secrets.token_hex(16), "labels": dict(labels), "expires": rfc3339(expires)},
        "spec": {"roles": ["Bot"], "bot_name": bot, "join_method": "token"},
    }


def is_bot_token(item, bot):
    spec = item.get("spec") or {}
    return spec.get("bot_name") == bot and "Bot" in (spec.get("roles") or [])


def find_tokens(tctl, bot, labels, now=None):
    """Pending (unexpired) tokens of ``bot`` whose labels include ``labels``."""
    now = now or utcnow()
    items = tctl.get("tokens", what="list join tokens (for bot %s)" % bot, with_secrets=True)
    found = []
    for item in items:
        meta = item.get("metadata") or {}
        have = meta.get("labels") or {}
        if not is_bot_token(item, bot):
            continue
        if any(have.get(k) != v for k, v in labels.items()):
            continue
        exp = parse_time(meta.get("expires"))
        if exp is not None and exp <= now:
            continue
        found.append(item)
    return found


def revoke(tctl, item, bot):
    """Make the token unusable without its name ever reaching argv: re-write it, expired, on stdin."""
    meta = dict(item.get("metadata") or {})
    value = meta.get("name")
    res = {
        "kind": "token",
        "version": item.get("version", "v2"),
        "metadata": {"name": value, "labels": meta.get("labels") or {},
                     "expires": rfc3339(utcnow() - datetime.timedelta(hours=1))},
        "spec": item.get("spec") or {"roles": ["Bot"], "bot_name": bot, "join_method": "token"},
    }
    tctl.create(res, "revoke a join token of bot %s" % bot, force=True, secrets=[value])


def _names(items):
    return set((i.get("metadata") or {}).get("name") for i in items)


def wait_tokens(tctl, bot, gone=(), present=(), labels=None):
    """Read until the pending tokens of ``bot`` show our writes: none of ``gone``, all of ``present``.

    The auth server answers reads from a cache that lags writes; without this a run right after a revoke
    (or a mint) would still see (or miss) the token. Returns True when the read caught up in time.
    """
    gone, present = set(gone), set(present)
    if not gone and not present:
        return True

    def caught_up(names):
        return not (names & gone) and present <= names

    names = wait_for(lambda: _names(find_tokens(tctl, bot, labels or {})), caught_up)
    return caught_up(names)


def revoke_value(tctl, value, bot):
    """Revoke a token we know only by value (the one `tctl bots add` printed)."""
    revoke(tctl, {"version": "v2", "metadata": {"name": value},
                  "spec": {"roles": ["Bot"], "bot_name": bot, "join_method": "token"}}, bot)
    wait_tokens(tctl, bot, gone=[value])


def revoke_all(tctl, bot):
    """Revoke every pending join token of ``bot``; return how many."""
    pending = find_tokens(tctl, bot, {})
    for item in pending:
        revoke(tctl, item, bot)
    wait_tokens(tctl, bot, gone=_names(pending))
    return len(pending)


def bot_exists(tctl, bot):
    return bool(tctl.get("user/bot-%s" % bot, what="read bot %s" % bot))


def proxy_address(tctl, params):
    if params.get("proxy_addr"):
        return params["proxy_addr"]
    for item in tctl.get("proxies", what="list proxies (to find the address hosts should join through)"):
        spec = item.get("spec") or {}
        addr = spec.get("public_addr") or (spec.get("public_addrs") or [None])[0]
        if addr:
            return addr
    return None


def ensure_token(tctl, params, check_mode):
    bot = params["bot"]
    labels = token_labels(params)
    seconds = ttl_seconds(bot, params["ttl"])
    ident = "bot token for %s%s" % (bot, (" (name %s)" % params["name"]) if params.get("name") else "")

    if params["state"] == "absent":
        if not params.get("name") and not params.get("labels"):
            raise LanyardError("%s: state=absent needs name or labels to pick the tokens to revoke. Fix: set name "
                               "(or labels) as when the token was minted." % ident)
        pending = find_tokens(tctl, bot, labels)
        result = dict(changed=bool(pending), revoked=len(pending))
        if pending and not check_mode:
            for item in pending:
                revoke(tctl, item, bot)
            if not wait_tokens(tctl, bot, gone=_names(pending), labels=labels):
                result["warnings"] = [_lag_warning(ident, "revoked")]
        verb = "would be revoked" if check_mode else "revoked"
        result["msg"] = ("%s: %d pending token(s) %s" % (ident, len(pending), verb) if pending else
                         "%s: no pending token" % ident)
        return result

    if not bot_exists(tctl, bot):
        raise LanyardError("%s: bot %s does not exist. Fix: create it first with lanyard.machine_id.teleport_bot."
                           % (ident, bot))
    pending = find_tokens(tctl, bot, labels) if params.get("name") else []
    status = tctl.status()
    result = dict(ca_pins=status["ca_pins"], cluster_name=status["cluster_name"],
                  proxy_addr=proxy_address(tctl, params), join_method="token", bot=bot)
    if pending and not params.get("force"):
        item = sorted(pending, key=lambda i: (i.get("metadata") or {}).get("expires") or "")[-1]
        result.update(changed=False, expires=(item.get("metadata") or {}).get("expires"),
                      msg="%s: a pending token exists (expires %s)" % (ident, (item.get("metadata") or {}).get("expires")))
        if not check_mode:
            result["token"] = item["metadata"]["name"]
        return result
    expires = utcnow() + datetime.timedelta(seconds=seconds)
    if check_mode:
        result.update(changed=True, expires=rfc3339(expires), msg="%s: would mint a token" % ident)
        return result
    for item in pending:  # force: the old pending token goes away with the new one in place
        revoke(tctl, item, bot)
    res = build_token(bot, labels, expires)
    value = res["metadata"]["name"]
    tctl.create(res, "mint a join token for bot %s" % bot, secrets=[value])
    result.update(changed=True, token=value, expires=rfc3339(expires),
                  msg="%s: minted a token (expires %s)" % (ident, rfc3339(expires)))
    if pending:
        result["revoked"] = len(pending)
    # a rerun looks the token up by its labels: return once a read shows it (and not the revoked ones)
    if not wait_tokens(tctl, bot, gone=_names(pending), present=[value], labels=labels):
        result["warnings"] = [_lag_warning(ident, "minted")]
    return result


def _lag_warning(ident, verb):
    return ("%s: the token was %s, but after %ss the auth server's token list does not reflect that yet (its "
            "cache lags), so a run right after this one may act again. Fix: check the auth server's health (`tctl "
            "status`)." % (ident, verb, int(DEFAULT_TIMEOUT)))
