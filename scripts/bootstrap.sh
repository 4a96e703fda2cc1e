#!/usr/bin/env bash
# Prepare a machine for the project: Debian packages, a Python venv outside the repo, and the
# ansible_collections/lanyard/machine_id link that Ansible and the tests import the collection by.
# Idempotent and quiet when everything is already there. Prints the venv path on its last line.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
cache=${LANYARD_CACHE:-$HOME/.cache/lanyard}
req="$top/requirements-test.txt"
key=$( (cat "$req"; python3 --version) | sha256sum | cut -c1-12)
venv="$cache/venv/$key"

# Debian packages the test suite needs (etcd for the bed, acl tools, systemd-nspawn and debootstrap
# for test hosts, strace for the agent's socket boundary test, promtool from prometheus for the metrics
# and alert rule tests). Installed only when missing.
pkgs=()
command -v setfacl >/dev/null || pkgs+=(acl)
command -v etcd >/dev/null || [ -x /usr/bin/etcd ] || pkgs+=(etcd-server)
command -v systemd-nspawn >/dev/null || pkgs+=(systemd-container)
command -v debootstrap >/dev/null || pkgs+=(debootstrap)
command -v strace >/dev/null || pkgs+=(strace)  # the agent boundary test traces bind()
command -v promtool >/dev/null || pkgs+=(prometheus)  # promtool check metrics / test rules
if [ ${#pkgs[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "[bootstrap] apt-get install ${pkgs[*]}" >&2
    mkdir -p "$cache"
    # One apt run at a time, even when several jobs bootstrap at once.
    (
      flock -w 600 9
      export DEBIAN_FRONTEND=noninteractive
      apt-get update -qq >&2
      # A dpkg run cut short earlier leaves packages half-configured; finish it before installing.
      dpkg --configure -a >&2 || apt-get -f install -y -qq >&2 || true
      apt-get install -y -qq --no-install-recommends -o DPkg::Lock::Timeout=300 "${pkgs[@]}" >&2
      # Only promtool is wanted: the Prometheus server this package enables would hold port 9090 for nothing.
      if [[ " ${pkgs[*]} " == *" prometheus "* ]] && command -v systemctl >/dev/null; then
        systemctl disable --now prometheus.service >/dev/null 2>&1 || true
      fi
    ) 9>"$cache/apt.lock"
  else
    echo "[bootstrap] missing Debian packages: ${pkgs[*]} -- run as root: apt-get install ${pkgs[*]}" >&2
    exit 1
  fi
fi

mkdir -p "$cache/venv"
(
  flock -w 900 9
  if [ ! -x "$venv/bin/python" ] || [ ! -f "$venv/.complete" ]; then
    echo "[bootstrap] creating venv $venv" >&2
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --upgrade pip >&2
    "$venv/bin/pip" install -q -r "$req" >&2
    touch "$venv/.complete"
  fi
) 9>"$cache/venv/.lock"
# The agent is installed from the working tree every time (cheap, and never stale).
if [ -f "$top/agent/pyproject.toml" ]; then
  "$venv/bin/pip" install -q --no-deps --no-build-isolation -e "$top/agent" >&2 2>/dev/null \
    || "$venv/bin/pip" install -q --no-deps -e "$top/agent" >&2
fi

coll="$top/build/collections/ansible_collections/lanyard"
mkdir -p "$coll"
ln -sfn "$top" "$coll/machine_id"
echo "$venv"
