# -*- coding: utf-8 -*-
# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Command line: check, init, start, status, wait, kube credentials, version.

Exit codes: 0 ok; 1 internal error or wait timeout; 2 bad configuration or arguments; 3 join failed;
4 renewal failed (--oneshot); 5 bot locked; 6 output could not be written.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional

from machine_id_agent import __version__
from machine_id_agent.errors import AgentError, ConfigError, OneLineParser

if TYPE_CHECKING:
    from machine_id_agent import config as configmod

# Every kubectl call through an exec-plugin kubeconfig runs this program (`kube credentials`): the console script
# imports this module, so it imports only the standard library and errors at the top; the config, logging and the
# exec plugin's own module are imported where a command needs them (main() sends `kube credentials` straight to
# kubecreds). The console script's entry point stays machine_id_agent.cli:main in every version, so a kubectl call
# that reads the command while an upgrade switches it imports a consistent agent (see the role's "Upgrades").


def _parser() -> argparse.ArgumentParser:
    from machine_id_agent import config as configmod
    from machine_id_agent import kubecreds
    p = OneLineParser(prog="machine-id-agent", description="Teleport Machine ID renewal agent for Kubernetes outputs.")
    p.add_argument("--version", action="version", version="machine-id-agent " + __version__)
    sub = p.add_subparsers(dest="cmd", parser_class=OneLineParser)

    def cfg_arg(sp, required=True):
        sp.add_argument("-c", "--config", default=None if not required else configmod.DEFAULT_PATH,
                        help="configuration file (default %s)" % configmod.DEFAULT_PATH)

    sp = sub.add_parser("check", help="validate the configuration offline")
    cfg_arg(sp)
    sp.add_argument("--json", action="store_true")

    sp = sub.add_parser("init", help="create a destination directory and set its ACLs (tbot init flags)")
    cfg_arg(sp, required=False)
    sp.add_argument("--init-dir", "--destination-dir", dest="init_dir")
    sp.add_argument("--bot-user", required=True, help="the user the agent runs as (gets rw)")
    sp.add_argument("--owner", help="USER:GROUP owning the directory (default: bot user and its group)")
    sp.add_argument("--reader-user", action="append", default=[], help="user that reads the outputs (repeatable)")
    sp.add_argument("--acls", choices=configmod.ACL_MODES, help="override acls from the config")
    sp.add_argument("--check", action="store_true",
                    help="change nothing; report what init would change (the role's check mode)")
    sp.add_argument("--json", action="store_true")

    sp = sub.add_parser("start", help="run the renewal service (or one renewal with --oneshot)")
    cfg_arg(sp)
    sp.add_argument("--oneshot", action="store_true", help="renew once, write outputs and exit")
    sp.add_argument("--debug", action="store_true")

    sp = sub.add_parser("status", help="report the stored identity and the outputs (offline)")
    cfg_arg(sp)
    sp.add_argument("--json", action="store_true")
    sp.add_argument("--check-acls", action="store_true",
                    help="also report, per output, what `init` would change there (owner, mode, ACLs), as this "
                         "user (run it as the agent's user): the role's no-change check")

    sp = sub.add_parser("wait", help="wait until the outputs are usable")
    sp.add_argument("-c", "--config", help="wait for every output of this config (file-based)")
    sp.add_argument("--diag-addr", help="wait for /readyz on this diagnostics address")
    sp.add_argument("--destination-dir", action="append", default=[], help="wait for this output directory")
    sp.add_argument("--timeout", type=float, default=60.0, help="seconds (default 60)")

    sp = sub.add_parser("kube", help="Kubernetes helpers")
    ksub = sp.add_subparsers(dest="kube_cmd", parser_class=OneLineParser)
    kc = ksub.add_parser("credentials", help="print an ExecCredential for kubectl (exec plugin mode)")
    kubecreds.add_arguments(kc)

    sub.add_parser("version", help="print the version")
    return p


def _load_config(path):
    """The config, with the storage's symlinks/acls rules applied to every storage access of this process."""
    from machine_id_agent import config as configmod
    from machine_id_agent import identity as identmod

    cfg = configmod.load(path)
    identmod.configure_storage(cfg.storage_symlinks, cfg.storage_acls)
    return cfg


def _err(msg: str) -> None:
    sys.stderr.write("machine-id-agent: %s\n" % msg)


def cmd_check(args) -> int:
    from machine_id_agent import config as configmod
    cfg = _load_config(args.config)
    if args.json:
        print(json.dumps({"ok": True, "config": str(cfg.source), "version": cfg.version,
                          "outputs": [str(o.destination) for o in cfg.outputs]}))
    else:
        print("ok: %s (%s, %d output%s, credential_ttl %s, renewal_interval %s)" % (
            cfg.source, cfg.version, len(cfg.outputs), "" if len(cfg.outputs) == 1 else "s",
            configmod.format_duration(cfg.credential_ttl), configmod.format_duration(cfg.renewal_interval)))
    return 0


def cmd_init(args) -> int:
    from machine_id_agent import config as configmod
    from machine_id_agent import acl
    cfg = _load_config(args.config) if args.config else None
    init_dir = args.init_dir
    readers: List[str] = list(args.reader_user)
    if cfg is not None:
        match = [o for o in cfg.outputs if init_dir and Path(os.path.normpath(init_dir)) == o.destination]
        if init_dir is None:
            if len(cfg.outputs) != 1:
                raise ConfigError("--init-dir: missing and %s has %d outputs; pass the destination to initialise"
                                  % (cfg.source, len(cfg.outputs)))
            match = cfg.outputs
            init_dir = str(cfg.outputs[0].destination)
        elif not match:
            raise ConfigError("--init-dir: %s is not a destination in %s; pass one of: %s" % (
                init_dir, cfg.source, ", ".join(str(o.destination) for o in cfg.outputs)))
        readers += [r for r in match[0].readers if r not in readers]
    if not init_dir:
        raise ConfigError("--init-dir: missing; pass the destination directory, e.g. --init-dir=/opt/machine-id")
    out = match[0] if cfg is not None else None
    # the destination's own acls/symlinks (tbot's keys), else the top-level acls
    mode = args.acls or ((out.acls or cfg.acls) if out is not None else "try")
    symlinks = out.symlinks if out is not None else configmod.DEFAULT_SYMLINKS
    bot_uid = acl.resolve_user(args.bot_user, "--bot-user")
    if args.owner:
        user, sep, group = args.owner.partition(":")
        if not user:
            raise ConfigError("--owner: %r is not USER:GROUP; pass it like --owner=teleport:teleport" % args.owner)
        owner_uid = acl.resolve_user(user, "--owner")
        if sep and group:
            owner_gid = acl.resolve_group(group, "--owner")
        else:
            owner_gid = _primary_gid(owner_uid)
    else:
        owner_uid, owner_gid = bot_uid, _primary_gid(bot_uid)
    reader_uids = [acl.resolve_user(r, "--reader-user") for r in readers]
    warnings: List[str] = []
    res = acl.init_dir(init_dir, owner_uid, owner_gid, bot_uid, reader_uids, mode, warn=warnings.append,
                       symlinks=symlinks, dry_run=args.check)
    for w in warnings:
        _err("warning: " + w)
    if args.json:
        print(json.dumps({"changed": res.changed, "path": res.path, "acl": res.acl, "acls": res.acls_used,
                          "actions": res.actions, "warnings": warnings, "check": bool(args.check)}))
    else:
        print(("would change: %s" % "; ".join(res.actions) if args.check else "changed") if res.changed
              else "unchanged")
    return 0


def _primary_gid(uid: int) -> int:
    import pwd
    try:
        return pwd.getpwuid(uid).pw_gid
    except KeyError:
        return uid


def cmd_start(args) -> int:
    from machine_id_agent import config as configmod
    from machine_id_agent import logs
    cfg = _load_config(args.config)
    from machine_id_agent.service import Agent
    log = logs.setup(debug=args.debug or cfg.debug)
    if args.oneshot or cfg.oneshot:
        return Agent(cfg, log=log).run_oneshot()
    agent = Agent(cfg, log=log, isolate=True)
    log.info("machine-id-agent %s starting: %d output(s), credential_ttl %s, renewal_interval %s", __version__,
             len(cfg.outputs), configmod.format_duration(cfg.credential_ttl),
             configmod.format_duration(cfg.renewal_interval))
    return agent.run()


def _acl_check(o, cfg: configmod.Config) -> Dict[str, Any]:
    """What ``init`` would change in an output's destination, judged as the running user (the agent's user, who owns
    it): ``init -c CONFIG`` run by that user, without changing anything. ``changed`` and ``actions``, or ``error``."""
    from machine_id_agent import acl
    warnings: List[str] = []
    try:
        uid = os.geteuid()
        readers = [acl.resolve_user(r, "readers of %s" % o.destination) for r in o.readers]
        res = acl.init_dir(o.destination, uid, _primary_gid(uid), uid, readers, o.acls or cfg.acls,
                           warn=warnings.append, symlinks=o.symlinks, dry_run=True)
    except (AgentError, OSError) as e:
        return {"error": str(e)}
    return {"changed": res.changed, "actions": res.actions, "warnings": warnings}


def status_doc(cfg: configmod.Config, backend=None, check_acls: bool = False) -> Dict[str, Any]:
    """What is on disk, judged offline: the identity, its state and the fix, and the outputs.

    ``identity.state`` is one of ``none`` (not joined yet), ``ok``, ``expired`` (a new token is needed),
    ``locked`` (Teleport refused this identity as an old generation and locked the bot), ``untrusted`` (a CA
    rotation the agent missed left it unable to trust the auth server safely, or the server to accept the
    identity: re-enrolment), ``lost-renewal``
    (a renewal Teleport counted never reached the disk; the agent does not present the identity, so the bot
    is not locked, but the host needs re-enrolment), ``storage-full`` (the storage cannot take the next
    renewal: the agent does not renew until it can), ``damaged``. ``problem`` and ``fix`` say it in words."""
    from machine_id_agent import config as configmod
    from machine_id_agent import identity as identmod
    from machine_id_agent import outputs
    now = _dt.datetime.now(_dt.timezone.utc)
    refusal = None
    ident_doc: Dict[str, Any] = {"present": False, "valid": False, "expires": None, "bot": None,
                                 "token_hash_matches": None, "state": "none", "problem": None, "fix": None}
    if backend is None:
        from machine_id_agent.service import Backend
        backend = Backend()
    try:
        ident = backend.load_identity(cfg.storage_dir)
    except PermissionError as e:
        raise ConfigError("storage %s: cannot read it (%s); run status as root or as the agent's user"
                          % (cfg.storage_dir, e.strerror or e)) from None
    except AgentError as e:
        ident = None
        ident_doc.update(present=True, error=str(e), state="damaged", problem=str(e),
                         fix="re-enrol the host: a new token from `tctl bots add` in the config")
    adoptable = False
    if ident is None and ident_doc["state"] == "none":
        # no identity.json: a host set up by hand with tbot; the agent imports tbot's identity when it starts
        from machine_id_agent import tbot_import
        try:
            ident = tbot_import.peek(cfg.storage_dir, now)
            adoptable = ident is not None
        except tbot_import.TbotIdentityError as e:
            ident_doc.update(present=True, source="tbot", state=e.state, problem=str(e).split("; ", 1)[0],
                             fix=tbot_import.FIX_JOIN)
        except AgentError as e:
            ident_doc.update(present=True, source="tbot", error=str(e), state="damaged", problem=str(e),
                             fix=tbot_import.FIX_JOIN)
        except PermissionError as e:
            raise ConfigError("storage %s: cannot read tbot's files (%s); run status as root or as the agent's "
                              "user" % (cfg.storage_dir, e.strerror or e)) from None
    bot = None
    if ident is not None:
        ident_doc.update(present=True, valid=bool(ident.valid()), expires=ident.not_after.isoformat(), state="ok")
        if adoptable:
            ident_doc["source"] = "tbot"  # valid and adoptable: no join token needed
        try:  # when the identity on disk was issued: the last join or renewal
            ident_doc["issued"] = ident.not_before.isoformat()
        except Exception:
            ident_doc["issued"] = None
        try:
            bot = ident_doc["bot"] = ident.bot_name
        except Exception:
            ident_doc["bot"] = None
        stored = backend.stored_token_hash(cfg.storage_dir)
        try:
            token = configmod.read_token(cfg)
        except ConfigError:
            token = None
        if stored is not None and token:
            want = backend.token_hash(token)
            ident_doc["token_hash_matches"] = stored == want
            refusal = identmod.token_refusal(cfg.storage_dir, want) if stored != want else None
        ident_doc["seconds_to_expiry"] = int((ident.not_after - now).total_seconds())
        ident_doc["generation"] = getattr(ident, "generation", None)
        try:
            reason = identmod.stale_reason(cfg.storage_dir, ident)
        except Exception:
            reason = None
        name = bot or "<bot>"
        reenrol = ("re-enrol the host: `tctl bots rm %s`, `tctl bots add %s --roles=...`, put the new token in the "
                   "config (or let the rollout re-enrol it), then restart the agent" % (name, name))
        if reason == identmod.STALE_LOCKED:
            ident_doc.update(state="locked", problem="Teleport locked bot %s: this identity was presented as an old "
                             "generation (generation mismatch)" % name,
                             fix="remove the lock (`tctl get locks`, `tctl rm lock/<id>`) and " + reenrol)
        elif reason == identmod.STALE_LOST:
            ident_doc.update(state="lost-renewal", problem="the identity lost a renewal (Teleport counts a newer "
                             "generation than the one on disk); it is never presented, so the bot is not locked; "
                             "the outputs work until %s" % ident.not_after.isoformat(), fix=reenrol)
        elif reason == identmod.STALE_UNTRUSTED:
            ident_doc.update(state="untrusted", problem="the identity is signed by a user CA the cluster no longer "
                             "trusts (a user CA rotation completed while the agent was not running); Teleport refuses "
                             "it for good; the outputs work until %s" % ident.not_after.isoformat(), fix=reenrol)
        elif not ident.valid():
            ident_doc.update(state="expired", problem="the bot identity expired at %s" % ident.not_after.isoformat(),
                             fix="put a new token from `tctl bots add` in the config; the agent joins again")
    from machine_id_agent import rotation

    trust = rotation.read_trust_note(cfg.storage_dir) if ident is not None else None
    if trust:
        ident_doc["ca_trust"] = trust  # what the agent did after a CA rotation it missed
        if trust.get("state") == "untrusted" and ident_doc["state"] == "ok":
            ident_doc.update(state="untrusted", problem=trust.get("problem"), fix=trust.get("fix"))
    if refusal and ident_doc["state"] == "ok" and ident_doc["valid"]:
        # Teleport refused the configured token and the agent keeps renewing the identity it has; with an expired
        # or stale identity the agent does not keep it (it tries the token at every cycle): state says what to do
        ident_doc["token_refused"] = refusal
    try:
        storage_owner = os.stat(cfg.storage_dir).st_uid
    except OSError:
        storage_owner = None
    # the room check writes a reservation the way the agent would: only as the agent's own user (root or another
    # user running `status` would be refused by the storage's owner check, which says nothing about room)
    if ident_doc["state"] == "ok" and storage_owner == os.geteuid():
        try:
            identmod.check_storage(cfg.storage_dir)
        except identmod.StorageError as e:
            ident_doc.update(state="storage-full", problem=str(e),
                             fix="free space in the filesystem of %s; the agent renews again by itself"
                             % cfg.storage_dir)
        except (AgentError, OSError):
            pass  # status may run as a user who cannot write there: not a verdict on the agent
    outs = []
    for o in cfg.outputs:
        d = outputs.inspect(o.destination, now)
        d["kubernetes_cluster"] = o.kubernetes_cluster
        if check_acls:
            d["acl_check"] = _acl_check(o, cfg)
        outs.append(d)
    return {"identity": ident_doc, "outputs": outs, "agent_version": __version__}


def cmd_status(args) -> int:
    cfg = _load_config(args.config)
    doc = status_doc(cfg, check_acls=args.check_acls)
    if args.json:
        print(json.dumps(doc))
    else:
        i = doc["identity"]
        if not i["present"]:
            print("identity: none (the agent has not joined yet)")
        else:
            refused = i.get("token_refused")
            print("identity: %s, %s until %s%s" % (
                i.get("bot") or "?", "valid" if i["valid"] else "NOT valid", i.get("expires"),
                "" if i["token_hash_matches"] in (None, True) else " (configured token differs: %s)" % (
                    "Teleport refused it, the agent keeps renewing this identity" if refused
                    else "re-join pending")))
            if refused:
                print("token: refused at %s: %s" % (refused.get("at"), refused.get("reason")))
        if i.get("source") == "tbot" and i["state"] == "ok":
            print("source: tbot's files in %s (the agent imports them when it starts; no token needed)"
                  % cfg.storage_dir)
        if i.get("problem"):
            print("state: %s: %s" % (i["state"].upper(), i["problem"]))
            print("fix: %s" % i["fix"])
        trust = i.get("ca_trust") or {}
        if trust.get("state") == "recovered":
            print("ca trust: re-established at %s after a missed host CA rotation, through %s" % (
                trust.get("at"), trust.get("how")))
        for o in doc["outputs"]:
            print("output %s: %s%s" % (o["destination"], "valid until %s" % o["expires"] if o["valid"] else "not valid",
                                       (" (%s)" % o["error"]) if o.get("error") else ""))
    return 0


def _readyz(addr: str) -> (bool, str):
    import urllib.error  # here, not at the top: every kubectl call runs this program (kube credentials)
    import urllib.request
    url = "http://%s/readyz" % addr
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status == 200, "ready"
    except urllib.error.HTTPError as e:
        try:
            reason = json.loads(e.read() or b"{}").get("reason") or "HTTP %d" % e.code
        except ValueError:
            reason = "HTTP %d" % e.code
        return False, reason
    except (urllib.error.URLError, OSError) as e:
        return False, "no answer from %s (%s)" % (url, getattr(e, "reason", e))


def cmd_wait(args) -> int:
    from machine_id_agent import config as configmod
    from machine_id_agent import outputs
    dests = [Path(d) for d in args.destination_dir]
    if args.config:
        dests += [o.destination for o in _load_config(args.config).outputs]
    if not dests and not args.diag_addr:
        raise ConfigError("wait: nothing to wait for; pass --diag-addr, -c FILE or --destination-dir")
    if args.diag_addr:
        configmod.check_addr(args.diag_addr, "--diag-addr", "127.0.0.1:9191")
    deadline = time.monotonic() + args.timeout
    reason = ""
    while True:
        ok = True
        if args.diag_addr:
            ok, reason = _readyz(args.diag_addr)
        if ok:
            for d in dests:
                st = outputs.inspect(d)
                if not st["valid"]:
                    ok, reason = False, "%s: %s" % (d, st.get("error") or "not valid")
                    break
        if ok:
            print("ready")
            return 0
        if time.monotonic() >= deadline:
            _err("wait: not ready after %gs: %s; check 'machine-id-agent status' and the agent's log"
                 % (args.timeout, reason))
            return 1
        time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))


def cmd_kube(args) -> int:
    from machine_id_agent import kubecreds
    if args.kube_cmd != "credentials":
        raise ConfigError("kube: missing subcommand; use 'machine-id-agent kube credentials --destination-dir D'")
    return kubecreds.run(args)


COMMANDS = {"check": cmd_check, "init": cmd_init, "start": cmd_start, "status": cmd_status, "wait": cmd_wait,
            "kube": cmd_kube}


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:2] == ["kube", "credentials"]:  # the exec plugin: nothing else imported
        from machine_id_agent import kubecreds
        return kubecreds.main(argv[2:])
    args = _parser().parse_args(argv)
    if args.cmd in (None, "version"):
        if args.cmd is None:
            _err("a command is needed: check, init, start, status, wait, kube credentials, version")
            return 2
        print("machine-id-agent " + __version__)
        return 0
    try:
        return COMMANDS[args.cmd](args)
    except AgentError as e:
        from machine_id_agent import logs
        _err(logs.REDACTOR.scrub(str(e)))
        return e.exit_code
    except KeyboardInterrupt:
        return 130
