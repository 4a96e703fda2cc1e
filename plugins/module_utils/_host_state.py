# -*- coding: utf-8 -*-
# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""PRIVATE to this collection: the I/O half of ``agent_state`` -- read, on a host, everything the role would
otherwise find out with one task each (its OS facts, the agent's Python, systemd, the agent's own status, the
files and directories the role writes, the unit's state, the destinations' ACLs, the reader's access).

Nothing here writes. Commands run with a fixed argv (no shell) and never see a secret: the token file is only
stat()ed. What is compared with what the role would write is in ``_host_drift``."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import glob
import grp
import hashlib
import json
import os
import platform
import pwd
import stat
import struct
import sys
import sysconfig

from ansible_collections.lanyard.machine_id.plugins.module_utils._errors import LanyardError

# The same probe preflight ran as a command task: version, wheel platform machine and libc of a Python.
PYTHON_PROBE = (
    "import json, platform, struct, sys, sysconfig;"
    "m = sysconfig.get_platform().split('-', 1)[-1].replace('-', '_').replace('.', '_');"
    "m = {'x86_64': 'i686', 'aarch64': 'armv7l'}.get(m, m) if struct.calcsize('P') == 4 else m;"
    "print(json.dumps({'python': '%d.%d' % sys.version_info[:2], 'machine': m, 'libc': platform.libc_ver()}))"
)


# /etc/os-release ID -> the distribution name Ansible's facts use (the role's support list is keyed by it)
DISTRIBUTIONS = {"debian": "Debian", "ubuntu": "Ubuntu"}


def host_info(module_python_version):
    """The host facts the role checks, read here instead of with a fact-gathering task (a second module run):
    the service manager, the distribution with its version, and the Python running this module."""
    release = {}
    for path in ("/etc/os-release", "/usr/lib/os-release"):
        text = read_text(path, limit=16384)
        if text is None:
            continue
        for line in text.splitlines():
            key, sep, value = line.partition("=")
            if sep and key.strip():
                release[key.strip()] = value.strip().strip('"').strip("'")
        break
    os_id = release.get("ID", "")
    version = release.get("VERSION_ID", "")
    if os.path.isdir("/run/systemd/system"):  # how systemd itself (sd_booted) tells it is PID 1
        manager = "systemd"
    else:
        manager = read_text("/proc/1/comm", limit=256) or "unknown"
    return {
        "service_mgr": manager,
        "distribution": DISTRIBUTIONS.get(os_id) or release.get("NAME") or os_id or "unknown",
        "distribution_version": version,
        "distribution_major_version": version.split(".")[0],
        "python": "%d.%d" % tuple(module_python_version[:2]),
    }


def wheel_target(probe):
    """``python:machine:glibc`` of the agent's Python from its probe (what the controller builds wheels for), or
    None when the probe did not answer."""
    if probe.get("rc") != 0:
        return None
    try:
        info = json.loads(probe.get("stdout") or "")
        return "%s:%s:%s" % (info["python"], info["machine"], info["libc"][1])
    except (ValueError, KeyError, IndexError, TypeError):
        return None


def can_i_words(verb, resource):
    """``[VERB, RESOURCE]`` of the verify question, checked: one word each, not an option (kubectl would take a
    word starting with ``-`` for a flag, e.g. ``--as``). LanyardError naming the bad value otherwise."""
    words = []
    for name, value in (("verb", verb), ("resource", resource)):
        value = (value or "").strip()
        if not value or value.startswith("-") or len(value.split()) != 1:
            raise LanyardError("the verify question's %s %r is not one kubectl word (as in `kubectl auth can-i list "
                               "pods`: a verb such as list or get, a resource such as pods, deployments.apps or "
                               "configmaps/NAME); set machine_id_verify_%s to one" % (name, value, name))
        words.append(value)
    return words


def cluster_check(module, reader_user, kubectl_path, directory, namespace, every_context=False, verb="list",
                  resource="pods"):
    """The verify phase's question to the cluster: ``kubectl auth can-i VERB RESOURCE -n NAMESPACE`` (``list
    pods`` by default, the guide's role) as the reader through the destination's kubeconfig -- its current
    context, or with ``every_context`` (a kubeconfig of several clusters, kubernetes/v2) each of its contexts,
    listed as the reader. One entry per question: ``directory``, ``context`` (None for the current one), ``rc``,
    ``stdout`` (``yes`` when allowed) and ``stderr``; a kubeconfig with no context gives one entry with
    ``no_context`` true, one whose contexts cannot be listed ``list_failed``."""
    question = can_i_words(verb, resource)
    as_reader = [] if not reader_user else ["runuser", "-u", reader_user, "--"]
    kubeconfig = os.path.join(directory, "kubeconfig.yaml")
    contexts = [None]
    if every_context:
        rc, out, err = run(module, as_reader + [kubectl_path, "--kubeconfig", kubeconfig, "config", "get-contexts",
                                                "-o", "name"])
        if rc != 0:
            return [{"directory": directory, "context": None, "list_failed": True, "rc": rc, "stdout": "",
                     "stderr": err.strip()[-500:]}]
        contexts = [line.strip() for line in out.splitlines() if line.strip()]
        if not contexts:
            return [{"directory": directory, "context": None, "no_context": True, "rc": 0, "stdout": "",
                     "stderr": ""}]
    checks = []
    for context in contexts:
        argv = as_reader + [kubectl_path, "--kubeconfig", kubeconfig] + (["--context", context] if context else []) \
            + ["--request-timeout", "30s", "auth", "can-i"] + question + ["-n", namespace]
        rc, out, err = run(module, argv)
        checks.append({"directory": directory, "context": context, "rc": rc, "stdout": out.strip(),
                       "stderr": " ".join(err.split())[-500:]})
    return checks


def run(module, argv):
    """``module.run_command`` for a probe: a program that is not there is an answer (rc 127), not a module failure
    (run_command fails the module when it cannot execute argv[0])."""
    prog = argv[0]
    path = prog if os.path.isabs(prog) else module.get_bin_path(prog)
    if not path or not os.access(path, os.X_OK):
        return 127, "", "%s: not found or not executable" % prog
    interpreter = _shebang(path)
    if interpreter and not os.access(interpreter, os.X_OK):  # e.g. a venv whose Python was removed
        return 127, "", "%s: its interpreter %s is not there" % (prog, interpreter)
    return module.run_command([path] + list(argv[1:]))


def _shebang(path):
    try:
        with open(path, "rb") as f:
            first = f.readline(512)
    except (IOError, OSError):
        return None
    if not first.startswith(b"#!"):
        return None
    words = first[2:].strip().split()
    return words[0].decode("utf-8", "replace") if words else None


def python_facts():
    """PYTHON_PROBE's answer for the Python running this module (the same computation)."""
    machine = sysconfig.get_platform().split("-", 1)[-1].replace("-", "_").replace(".", "_")
    if struct.calcsize("P") == 4:
        machine = {"x86_64": "i686", "aarch64": "armv7l"}.get(machine, machine)
    return {"python": "%d.%d" % sys.version_info[:2], "machine": machine, "libc": platform.libc_ver()}


def agent_python(module, python):
    """The probe of ``python``: answered here, without a process, when ``python`` is the Python running this
    module (the role's default on a host where Ansible uses /usr/bin/python3)."""
    try:
        same = bool(sys.executable) and os.path.samefile(python, sys.executable)
    except OSError:
        same = False
    if same:
        return {"rc": 0, "stdout": json.dumps(python_facts()), "stderr": ""}
    rc, out, err = run(module, [python, "-c", PYTHON_PROBE])
    result = {"rc": rc, "stdout": out.strip(), "stderr": err.strip()[-500:]}
    if rc != 0 and not err:
        result["stderr"] = "%s did not run" % python
    return result


def systemd_version(module):
    rc, out, _err = run(module, ["systemctl", "--version"])
    if rc != 0 or not out.strip():
        return None
    word = out.splitlines()[0].split()[1]
    digits = ""
    for ch in word:
        if not ch.isdigit():
            break
        digits += ch
    return int(digits) if digits else None


def _owner(uid):
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _group(gid):
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def path_state(path, checksum=False):
    """``{"exists", "type", "owner", "group", "mode", "sha256"}`` of a path (lstat: a symlink is reported as one)."""
    try:
        st = os.lstat(path)
    except OSError:
        return {"exists": False}
    kind = "file" if stat.S_ISREG(st.st_mode) else "directory" if stat.S_ISDIR(st.st_mode) else \
        "link" if stat.S_ISLNK(st.st_mode) else "other"
    result = {"exists": True, "type": kind, "owner": _owner(st.st_uid), "group": _group(st.st_gid),
              "mode": "%04o" % stat.S_IMODE(st.st_mode)}
    if checksum and kind == "file":
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(65536), b""):
                digest.update(block)
        result["sha256"] = digest.hexdigest()
    return result


def users(names):
    """Each user's primary group, home and shell, or None when the host has no such user."""
    result = {}
    for name in names:
        try:
            pw = pwd.getpwnam(name)
        except KeyError:
            result[name] = None
            continue
        result[name] = {"group": _group(pw.pw_gid), "home": pw.pw_dir, "shell": pw.pw_shell}
    return result


def groups_exist(names):
    result = {}
    for name in names:
        try:
            grp.getgrnam(name)
            result[name] = True
        except KeyError:
            result[name] = False
    return result


UNIT_PROPERTIES = ("LoadState", "ActiveState", "UnitFileState", "NeedDaemonReload", "ExecStart", "MainPID")


def _show(module, names):
    argv = ["systemctl", "show"] + list(names)
    for prop in UNIT_PROPERTIES:
        argv += ["-p", prop]
    rc, out, _err = run(module, argv)
    blocks = []
    for block in out.split("\n\n") if rc == 0 else []:
        props = {}
        for line in block.splitlines():
            key, _sep, value = line.partition("=")
            if key:
                props[key] = value
        if props:
            blocks.append(props)
    return blocks


def unit_state(module, name):
    """The properties the role judges of one unit (``{}`` when systemctl cannot tell)."""
    blocks = _show(module, [name])
    return blocks[0] if len(blocks) == 1 else {}


def units_state(module, names):
    """``unit_state`` of each of ``names`` (unique), asked in one ``systemctl show`` (one block per unit, in the
    order asked, empty properties left out, never a whole block); unit by unit when that answer cannot be matched
    to the names (a name systemctl refuses fails the whole call)."""
    names = sorted(set(names), key=list(names).index)
    blocks = _show(module, names) if names else []
    if len(blocks) != len(names) or any("LoadState" not in b for b in blocks):
        return dict((name, unit_state(module, name)) for name in names)
    return dict(zip(names, blocks))


def process_argv(pid):
    """The command line of process ``pid`` (a list of str; [] when there is none, it is gone or unreadable)."""
    try:
        pid = int(pid)
    except (TypeError, ValueError):
        return []
    if pid <= 0:
        return []
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            raw = f.read()
    except (IOError, OSError):
        return []
    return [a.decode("utf-8", "replace") for a in raw.split(b"\0")[:-1]]


def link_target(path):
    """Where ``path`` points when it is a symlink (made absolute), else ``path`` itself."""
    try:
        target = os.readlink(path)
    except (IOError, OSError):
        return os.path.normpath(path)
    return os.path.normpath(os.path.join(os.path.dirname(path), target))


# tbot v13's identity files in its storage directory (lib/tbot/identity); the agent imports them (tbot_import.py)
TBOT_FILES = ("key", "tlscert", "key-cert.pub", "sshcert", "tlscacerts", "sshcacerts")
TBOT_FILE_MAX = 1 << 20


def tbot_files(storage_dir):
    """tbot's identity files in ``storage_dir`` (name -> bytes; absent when missing, a symlink or not a regular
    file). Read as root by the module; nothing is written."""
    out = {}
    for name in TBOT_FILES:
        path = os.path.join(storage_dir, name)
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
        except (IOError, OSError):
            continue
        try:
            if stat.S_ISREG(os.fstat(fd).st_mode):
                out[name] = os.read(fd, TBOT_FILE_MAX)
        finally:
            os.close(fd)
    return out


def small_text(path, limit=65536):
    """The first ``limit`` bytes of a regular file as text, or None."""
    try:
        with open(path, "rb") as f:
            return f.read(limit).decode("utf-8", "replace")
    except (IOError, OSError):
        return None


def agent_status(module, agent_bin, bot_user, config_path, check_acls=False):
    """The agent's own ``status --json`` as the bot user (the same call preflight made as a task); with
    ``check_acls`` also what ``init`` would change in each output (``outputs[].acl_check``), from an agent that
    knows ``--check-acls`` (an older one is asked again without it)."""
    argv = ["runuser", "-u", bot_user, "--", agent_bin, "status", "-c", config_path, "--json"]
    rc, out, err = run(module, argv + (["--check-acls"] if check_acls else []))
    if check_acls and rc == 2 and "--check-acls" in err:
        rc, out, err = run(module, argv)
    text = out.strip()
    if rc == 0 and text.startswith("{"):
        try:
            return json.loads(text), None
        except ValueError:
            pass
    return {}, (err.strip() or text)[-500:] or "status exited %d" % rc


def destination_acls(module, agent_bin, directory, acls, bot_user, bot_group, reader_user):
    """``init --check`` on one destination: None when nothing would change, else what would."""
    argv = [agent_bin, "init", "--check", "--acls", acls, "--init-dir", directory, "--bot-user", bot_user,
            "--owner", "%s:%s" % (bot_user, bot_group)]
    if reader_user:
        argv += ["--reader-user", reader_user]
    rc, out, err = run(module, argv)  # (checked like every probe: a missing interpreter is an answer)
    if rc == 0 and "unchanged" in out:
        return None
    if rc == 2 and "unrecognized arguments" in err and "--check" in err:
        # an agent of a collection older than `init --check`: a difference all the same (its ACLs are not judged),
        # and named as such instead of with argparse's usage error (the install phase replaces that agent)
        return "ACLs not judged: the installed agent is older than init --check"
    return (out.strip() or err.strip() or "init --check exited %d" % rc)[-500:]


def reader_reads(module, reader_user, agent_bin, directory):
    """Whether the reader user, running the agent's own program (the one the kubeconfig's exec plugin is), reads a
    matching, valid key and certificate in ``directory`` -- what the verify phase checks. Prints no secret."""
    rc, out, err = run(module, ["runuser", "-u", reader_user, "--", agent_bin, "wait", "--destination-dir",
                                directory, "--timeout", "5"])
    return None if rc == 0 else (err.strip() or out.strip() or "exit %d" % rc)[-300:]


def read_text(path, limit=4096):
    try:
        with open(path, "r") as f:
            return f.read(limit).strip()
    except (IOError, OSError):
        return None


def glob_paths(pattern):
    return sorted(glob.glob(pattern)) if pattern else []
