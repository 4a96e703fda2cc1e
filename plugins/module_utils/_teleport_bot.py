# -*- coding: utf-8 -*-
# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""PRIVATE to this collection: the teleport_bot service.

A Machine ID bot is, on every Teleport version we know, a user ``bot-<name>`` (label
``teleport.internal/bot``) with the role ``bot-<name>``. The roles the bot may use are that role's
``spec.allow.impersonate.roles``; its logins are the user's ``logins`` trait; its max session TTL is
the role's ``spec.options.max_session_ttl``. We read those two resources (``tctl get``), which works
the same on v13 and newer, and change them only through ``tctl bots ...``.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import datetime
import re

from ansible_collections.lanyard.machine_id.plugins.module_utils._errors import LanyardError
from ansible_collections.lanyard.machine_id.plugins.module_utils._teleport_resource import (
    format_duration,
    parse_duration,
    strip_volatile,
)
from ansible_collections.lanyard.machine_id.plugins.module_utils._teleport_token import parse_time
from ansible_collections.lanyard.machine_id.plugins.module_utils._teleport_wait import DEFAULT_TIMEOUT, wait_for
from ansible_collections.lanyard.machine_id.plugins.module_utils._teleport_yaml import to_yaml

BOT_ARGSPEC = dict(
    name=dict(type="str", required=True),
    state=dict(type="str", default="present", choices=["present", "absent"]),
    roles=dict(type="list", elements="str"),
    logins=dict(type="list", elements="str"),
    max_session_ttl=dict(type="str"),
    force=dict(type="bool", default=False),
    rejoin=dict(type="bool", default=False),
    remove_locks=dict(type="bool", default=False),
    return_token=dict(type="bool", default=False),
    token_ttl=dict(type="str", default="1h", no_log=False),
    locked_users=dict(type="list", elements="str"),
)

GENERATION_LABEL = "teleport.internal/bot-generation"
# v13.3.8 ``tctl bots add`` with a role that does not exist: "error while creating bot\nrole nope-role is not found"
_UNKNOWN_ROLE_RE = re.compile(r"\brole \"?([^\s\"]+)\"? is not found")
MAX_SESSION_TTL_LIMIT = 168 * 3600
DEFAULT_MAX_SESSION_TTL = 12 * 3600


def bot_user(name):
    return "bot-%s" % name


def read_bot(tctl, name):
    """The bot's state as dict(roles, logins, max_session_ttl), or None when there is no such bot."""
    users = tctl.get("user/%s" % bot_user(name), what="read bot %s (user %s)" % (name, bot_user(name)))
    if not users:
        return None
    user = users[0]
    labels = (user.get("metadata") or {}).get("labels") or {}
    if "teleport.internal/bot" not in labels:
        raise LanyardError("bot %s: user %s exists but is not a Machine ID bot (no teleport.internal/bot label). "
                           "Fix: choose another bot name, or remove that user." % (name, bot_user(name)))
    roles_res = tctl.get("role/%s" % bot_user(name), what="read bot %s (role %s)" % (name, bot_user(name)))
    spec = (roles_res[0].get("spec") or {}) if roles_res else {}
    allow = spec.get("allow") or {}
    impersonate = allow.get("impersonate") or {}
    traits = (user.get("spec") or {}).get("traits") or {}
    ttl = (spec.get("options") or {}).get("max_session_ttl")
    try:
        generation = int(labels.get(GENERATION_LABEL) or 0)
    except (TypeError, ValueError):
        generation = 0
    return dict(
        generation=generation,
        name=name,
        user_name=bot_user(name),
        role_name=bot_user(name),
        roles=sorted(impersonate.get("roles") or []),
        logins=sorted(traits.get("logins") or []),
        max_session_ttl=format_duration(parse_duration(ttl)) if parse_duration(ttl) is not None else ttl,
    )


def desired_bot(params, current):
    """What the user declared, filled from ``current`` for options left unset."""
    name = params["name"]
    roles = params.get("roles")
    if roles is None:
        if current is None:
            raise LanyardError("bot %s does not exist and roles is not set. Fix: set roles (the Teleport roles the "
                               "bot may use, e.g. [machine-id-kube-role])." % name)
        roles = current["roles"]
    roles = sorted(set(r.strip() for r in roles if r and r.strip()))
    if not roles:
        raise LanyardError("bot %s: roles is empty. Fix: give at least one Teleport role." % name)
    logins = params.get("logins")
    logins = sorted(set(logins)) if logins is not None else (current["logins"] if current else [])
    ttl = params.get("max_session_ttl")
    if ttl is not None:
        seconds = parse_duration(ttl)
        if seconds is None or seconds <= 0:
            raise LanyardError("bot %s: max_session_ttl %r is not a duration. Fix: use a Go duration such as 12h or "
                               "30m." % (name, ttl))
        if seconds > MAX_SESSION_TTL_LIMIT:
            raise LanyardError("bot %s: max_session_ttl %s is above Teleport's limit of 168h. Fix: use at most 168h."
                               % (name, ttl))
        ttl = format_duration(seconds)
    elif current is not None:
        ttl = current["max_session_ttl"]
    return dict(name=name, user_name=bot_user(name), role_name=bot_user(name), roles=roles, logins=logins,
                max_session_ttl=ttl)


def bot_changes(desired, current):
    """Names of the fields that differ (empty when the bot is up to date)."""
    if current is None:
        return ["bot"]
    changed = []
    for key in ("roles", "logins"):
        if sorted(desired[key]) != sorted(current[key]):
            changed.append(key)
    d, c = parse_duration(desired.get("max_session_ttl")), parse_duration(current.get("max_session_ttl"))
    if desired.get("max_session_ttl") is not None and d != c:
        changed.append("max_session_ttl")
    return changed


def missing_roles(tctl, name, roles):
    """The roles of ``roles`` Teleport does not list (one ``tctl get roles``)."""
    items = tctl.get("roles", what="list roles (to check the roles of bot %s)" % name)
    known = set((i.get("metadata") or {}).get("name") for i in items)
    return [r for r in roles if r not in known]


def _missing_roles_error(name, missing):
    return LanyardError("bot %s: role(s) %s do not exist in Teleport. Fix: create them first (for example with "
                        "lanyard.machine_id.teleport_role) or correct roles." % (name, ", ".join(missing)))


def check_roles_exist(tctl, name, roles, check_mode=False):
    """Fail when a role is unknown; in check mode only warn (an earlier task may create it)."""
    def read_missing():
        return missing_roles(tctl, name, roles)

    missing = read_missing()
    if missing and not check_mode:
        # a role created by the previous task may not be in the auth server's cache yet
        missing = wait_for(read_missing, lambda m: not m)
    if missing and check_mode:
        return ["bot %s: role(s) %s do not exist yet; the real run fails unless an earlier task creates them."
                % (name, ", ".join(missing))]
    if missing:
        raise _missing_roles_error(name, missing)


def locks_in_force(tctl, what):
    """The locks in force as dicts (name, user, message): ``tctl get locks`` without the expired ones."""
    now = datetime.datetime.now(datetime.timezone.utc)
    found = []
    for item in tctl.get("locks", what=what):
        spec = item.get("spec") or {}
        name = (item.get("metadata") or {}).get("name")
        expires = parse_time(spec.get("expires"))  # unreadable or none: the lock is in force
        if expires is not None and expires <= now:
            continue
        if name:
            found.append(dict(name=name, user=(spec.get("target") or {}).get("user"), message=spec.get("message") or ""))
    return found


def bot_locks(tctl, name):
    """(name, message) of the locks in force that target the bot's user (Teleport sets one when an old
    generation of the bot's identity is presented for renewal)."""
    return [(lk["name"], lk["message"]) for lk in locks_in_force(tctl, "list locks (to check bot %s)" % name)
            if lk["user"] == bot_user(name)]


def rejoin_plan(tctl, name, current, remove_locks, locked_users=None):
    """For O(rejoin): None when the bot can take a new join token as it is (it does not exist, or it never
    joined); else the list of lock names to remove before the bot is recreated. Teleport (v13 and later)
    refuses a second join of a bot whose user already carries a generation ("has already been issued a
    renewable certificate"), so such a bot is recreated; a lock on the bot's user would lock the new bot too.

    ``locked_users``: the users a lock in force targets, as the caller read them once for many bots
    (teleport_cluster_info's ``locked_users``); the locks are then read only when the bot's user is among them.
    None: read them."""
    if current is None or not current.get("generation"):
        return None
    if locked_users is not None and bot_user(name) not in locked_users:
        return []
    locks = bot_locks(tctl, name)
    if locks and not remove_locks:
        raise LanyardError(
            "bot %s is locked (%s). Teleport locks a bot when an older copy of its identity is presented for renewal: "
            "a second agent, a copy of the host's storage or a restored backup used it. Fix: find that copy; then "
            "allow re-enrolment with remove_locks: true (rollout: machine_id_reenrol_locked: true), which removes the "
            "lock and recreates the bot, or remove the lock yourself (`tctl rm lock/<name>`)."
            % (name, "; ".join("lock/%s: %s" % (n, m) if m else "lock/%s" % n for n, m in locks)))
    return [n for n, _m in locks]


def _view(bot):
    return dict((k, bot[k]) for k in ("name", "roles", "logins", "max_session_ttl") if bot is not None)


def public(bot):
    """The bot as the module returns it (without the internal generation)."""
    return None if bot is None else dict((k, v) for k, v in bot.items() if k != "generation")


def add_bot(tctl, desired, token_ttl):
    """``tctl bots add`` -> (token, token_ttl) from its JSON output.

    The roles are not read before: ``bots add`` itself refuses a role that does not exist (v13.3.8: "role X is not
    found", and it writes nothing then). Only on that answer are the roles read (``tctl get roles``): a role an
    earlier task just created may not be in the auth server's cache yet, so the roles are read until they show
    (then the add is tried once more), else the error names the missing roles and the fix."""
    try:
        return _bots_add(tctl, desired, token_ttl)
    except LanyardError as exc:
        if not _UNKNOWN_ROLE_RE.search("%s\n%s" % (exc.details.get("stderr") or "", exc.msg)):
            raise
    name = desired["name"]
    missing = wait_for(lambda: missing_roles(tctl, name, desired["roles"]), lambda m: not m)
    if missing:
        raise _missing_roles_error(name, missing)
    return _bots_add(tctl, desired, token_ttl)


def _bots_add(tctl, desired, token_ttl):
    args = ["bots", "add", desired["name"], "--roles=%s" % ",".join(desired["roles"])]
    if desired["logins"]:
        args.append("--logins=%s" % ",".join(desired["logins"]))
    # 12h is what `bots add` gives without the flag: the version (one more tctl run) only for another TTL
    if (desired.get("max_session_ttl") and parse_duration(desired["max_session_ttl"]) != DEFAULT_MAX_SESSION_TTL
            and tctl.version().has_bot_max_session_ttl):
        args.append("--max-session-ttl=%s" % desired["max_session_ttl"])
    if token_ttl:
        args.append("--ttl=%s" % token_ttl)
    out = tctl.run_json(args, "create bot %s" % desired["name"])
    token = out.get("token_id") if isinstance(out, dict) else None
    if not token:
        raise LanyardError("bot %s was created but tctl printed no token_id in its JSON output. Fix: check the bot "
                           "with `tctl bots ls`." % desired["name"])
    ttl = out.get("token_ttl")
    if ttl is None and isinstance(out.get("ttl"), (int, float)):  # v13: nanoseconds
        ttl = format_duration(out["ttl"] / 1e9)
    return token, ttl


def update_bot_role(tctl, desired):
    """Teleport 13/14 (no ``bots update``): set the roles in the bot's own role ``bot-<name>``.

    Proven on v13.3.8 with the real tbot: the next renewal of an existing bot identity impersonates the new
    set of roles (added and removed), without a new join.
    """
    name = desired["name"]
    items = tctl.get("role/%s" % bot_user(name), what="read role %s of bot %s" % (bot_user(name), name))
    if not items:
        raise LanyardError("bot %s: its role %s is missing, so its roles cannot be changed in place. Fix: set "
                           "force: true to recreate the bot." % (name, bot_user(name)))
    role = strip_volatile(items[0])
    allow = role.setdefault("spec", {}).setdefault("allow", {})
    impersonate = allow.get("impersonate") or {}
    impersonate["roles"] = list(desired["roles"])
    allow["impersonate"] = impersonate
    tctl.create(role, "update role %s of bot %s" % (bot_user(name), name), force=True)


def update_bot(tctl, desired, current, changes):
    """In-place update with ``tctl bots update`` (tctl v15+)."""
    args = ["bots", "update", desired["name"]]
    if "roles" in changes:
        args.append("--set-roles=%s" % ",".join(desired["roles"]))
    if "logins" in changes:
        args.append("--set-logins=%s" % ",".join(desired["logins"]))
    if "max_session_ttl" in changes:
        args.append("--set-max-session-ttl=%s" % desired["max_session_ttl"])
    tctl.run(args, "update bot %s" % desired["name"])


def ensure_bot(tctl, params, check_mode, revoke_token, revoke_pending=None):
    """Return the module result.

    ``revoke_token(value)`` makes the join token ``bots add`` printed unusable; ``revoke_pending(name)``
    revokes the bot's pending join tokens when the bot is deleted (``tctl bots rm`` leaves them).
    """
    name = params["name"]
    current = read_bot(tctl, name)
    header = "bot/%s" % name
    if params["state"] == "absent":
        result = dict(changed=current is not None, bot=None,
                      diff=dict(before=to_yaml(_view(current)) if current else "", after="",
                                before_header=header, after_header=header))
        if current is not None and not check_mode:
            tctl.run(["bots", "rm", name], "delete bot %s" % name)
            if revoke_pending is not None:
                result["revoked_tokens"] = revoke_pending(name)
            # the auth server's cache lags writes: return once a read no longer shows the bot
            if wait_for(lambda: read_bot(tctl, name), lambda b: b is None) is not None:
                result["warnings"] = ["bot %s was deleted, but the auth server still lists it after %ss (its cache "
                                      "lags), so a run right after this one may report a change. Fix: check the auth "
                                      "server's health (`tctl status`) and rerun." % (name, int(DEFAULT_TIMEOUT))]
        result["msg"] = ("bot %s %s" % (name, "would be deleted" if check_mode else "deleted")) if current else \
            "bot %s is absent" % name
        return result

    desired = desired_bot(params, current)
    changes = bot_changes(desired, current)
    diff = dict(before=to_yaml(_view(current)) if current else "", after=to_yaml(_view(desired)),
                before_header=header, after_header=header)
    locks = rejoin_plan(tctl, name, current, params.get("remove_locks"), params.get("locked_users")) \
        if params.get("rejoin") else None
    if locks is not None:
        return _rejoin(tctl, params, check_mode, desired, current, locks, diff, revoke_token, revoke_pending)
    if not changes:
        return dict(changed=False, bot=public(current), diff=diff, msg="bot %s is up to date" % name)
    # a new bot: `bots add` checks its roles itself (add_bot); check mode and in-place changes read them first
    role_warnings = check_roles_exist(tctl, name, desired["roles"], check_mode) \
        if (check_mode or current is not None) else None
    # the version (one more tctl run) only where a decision needs it: never for a new bot without max_session_ttl
    version = tctl.version() if current is not None else None
    sets_ttl = (desired.get("max_session_ttl") and
                parse_duration(desired["max_session_ttl"]) != DEFAULT_MAX_SESSION_TTL and
                (current is None or "max_session_ttl" in changes))
    if sets_ttl:
        version = version or tctl.version()
    if sets_ttl and not version.has_bot_max_session_ttl:
        raise LanyardError("bot %s: tctl %s cannot set max_session_ttl (its `bots add` has no --max-session-ttl; new "
                           "bots get 12h). Fix: leave max_session_ttl unset or 12h, or upgrade Teleport."
                           % (name, version))

    result = dict(changed=True, bot=desired, diff=diff, warnings=list(role_warnings or []))
    recreate = False
    role_only = False
    if current is not None:
        if not version.has_bots_update and changes == ["roles"]:
            role_only = True
        elif not version.has_bots_update:
            if not params.get("force"):
                raise LanyardError(
                    "bot %s: %s differ(s) from the server (%s), and tctl %s has no `bots update` (it arrived in "
                    "Teleport 15), so only the bot's roles can be changed in place. Fix: set force: true to delete and "
                    "recreate the bot (its existing identities stop working and every host must join again with a "
                    "new token), or upgrade Teleport."
                    % (name, ", ".join(changes), _describe(changes, desired, current), version))
            recreate = True
            result["warnings"].append(
                "bot %s was deleted and recreated to change %s: identities issued to it stop working; every host "
                "must join again with a new token." % (name, ", ".join(changes)))
    if check_mode:
        result["msg"] = "bot %s would be %s" % (name, "created" if current is None else
                                                ("recreated" if recreate else "updated"))
        return _finish(result)

    if role_only:
        update_bot_role(tctl, desired)
        result["msg"] = ("bot %s updated (roles, in its role %s; hosts get the new roles at their next renewal)"
                         % (name, bot_user(name)))
        result["bot"] = wait_for(lambda: read_bot(tctl, name), lambda b: not bot_changes(desired, b))
        return _finish(result)
    if current is not None and not recreate:
        update_bot(tctl, desired, current, changes)
        result["msg"] = "bot %s updated (%s)" % (name, ", ".join(changes))
        result["bot"] = wait_for(lambda: read_bot(tctl, name), lambda b: not bot_changes(desired, b))
        return _finish(result)

    if recreate:
        _delete_bot(tctl, name, revoke_pending, "delete bot %s (to recreate it)" % name)
    result["msg"] = "bot %s %s" % (name, "recreated" if recreate else "created")
    return _add_bot_and_hand_over(tctl, params, desired, result, revoke_token, lambda b: not bot_changes(desired, b))


def _delete_bot(tctl, name, revoke_pending, what):
    """``tctl bots rm``, then its pending join tokens revoked (``bots rm`` leaves them)."""
    tctl.run(["bots", "rm", name], what)
    if revoke_pending is not None:
        revoke_pending(name)


def _add_bot_and_hand_over(tctl, params, desired, result, revoke_token, settled):
    """``tctl bots add``; its token returned (return_token) or revoked at once.

    With return_token the token is the hand-over: the caller's next step is a join with it (on v13.3.8 a read right
    after ``bots add`` showed the bot and its token every time, and hosts joined with it at once). So the bot is
    not read back (that read cost
    two tctl runs per new host of a rollout; docs/protocol-findings.md has what the real v13 showed). Without it, the caller
    usually mints a token next (teleport_bot_token reads the bot first), so the task returns once a read shows the
    bot ``settled``."""
    token, token_ttl = add_bot(tctl, desired, params.get("token_ttl"))
    if params.get("return_token"):
        result["token"] = token
        result["token_ttl"] = token_ttl
    else:
        result["bot"] = wait_for(lambda: read_bot(tctl, desired["name"]), settled) or desired
        revoke_token(token)
    return _finish(result)


def _rejoin(tctl, params, check_mode, desired, current, locks, diff, revoke_token, revoke_pending):
    """Recreate a bot that already joined so that a host without a usable identity can join again."""
    name = desired["name"]
    # in a real run `bots add` checks the roles (add_bot); but a bot deleted for nothing would be worse than a read
    role_warnings = check_roles_exist(tctl, name, desired["roles"], check_mode)
    why = ("it already joined (generation %s), and Teleport lets a bot join only once" % current["generation"])
    result = dict(changed=True, bot=desired, diff=diff, recreated=True, removed_locks=list(locks),
                  warnings=list(role_warnings or []))
    result["warnings"].append(
        "bot %s %s recreated so its host can join again: %s. Identities issued to the old bot stop working%s."
        % (name, "would be" if check_mode else "was", why,
           "; lock(s) %s %s removed" % (", ".join(locks), "would be" if check_mode else "were") if locks else ""))
    if check_mode:
        result["msg"] = "bot %s would be recreated (rejoin: %s)" % (name, why)
        return _finish(result)
    _delete_bot(tctl, name, revoke_pending, "delete bot %s (to recreate it for a new join)" % name)
    for lock in locks:
        tctl.run(["rm", "lock/%s" % lock], "remove lock %s of bot %s" % (lock, name), not_found_ok=True)
    # the cache still shows the old user (with its generation) for a moment; `bots add` must see it gone
    wait_for(lambda: read_bot(tctl, name), lambda b: b is None)
    result["msg"] = "bot %s recreated for a new join (%s)" % (name, why)
    return _add_bot_and_hand_over(tctl, params, desired, result, revoke_token,
                                  lambda b: b is not None and not b.get("generation") and not bot_changes(desired, b))


def _describe(changes, desired, current):
    return "; ".join("%s: %s -> %s" % (k, current.get(k), desired.get(k)) for k in changes)


def _finish(result):
    result["bot"] = public(result.get("bot"))
    if not result.get("warnings"):
        result.pop("warnings", None)
    return result
