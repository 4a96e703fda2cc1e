#!/usr/bin/env bash
# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
#
# Run `ansible-test sanity` over the whole collection, without Docker, with the project venv.
#
#   scripts/sanity.sh                 # every sanity test
#   scripts/sanity.sh --test pep8     # extra arguments go to ansible-test unchanged
#
# `--venv` makes one virtualenv per sanity test and bootstraps pip in it with a script it downloads
# from ci-files.testing.ansible.com, a host this machine cannot reach. ansible-test first looks for
# that script in ~/.ansible/test/cache/get_pip_<version>.py, so we place a stand-in there that
# installs the same pip version from PyPI's wheel (hash-checked against PyPI's simple index). A real
# get-pip script that is already cached is left alone.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
# LANYARD_SANITY_VENV: another ansible-core's venv (the controller matrix, tests/helpers/matrix.py); its Python
# runs the tests. Default: the project venv.
if [ -n "${LANYARD_SANITY_VENV:-}" ]; then
  venv=$LANYARD_SANITY_VENV
else
  venv=$("$top/scripts/bootstrap.sh" | tail -n1)
fi
py="$venv/bin/python"
export PATH="$venv/bin:$PATH"
export PYTHONDONTWRITEBYTECODE=1

# The pip version ansible-test bootstraps into its venvs (read from the installed ansible-test).
pip_version=$("$py" - <<'EOF'
import re
from ansible_test._internal import python_requirements as r
src = open(r.__file__, encoding="utf-8").read()
m = re.search(r"default_packages\s*=\s*dict\(\s*pip='([0-9.]+)'", src)
print(m.group(1) if m else "")
EOF
)
if [ -z "$pip_version" ]; then
  echo "sanity: cannot tell which pip version ansible-test bootstraps; update scripts/sanity.sh" >&2
  exit 1
fi
cache_dir="$HOME/.ansible/test/cache"
stand_in="$cache_dir/get_pip_${pip_version//./_}.py"
marker="# lanyard get-pip stand-in"
if [ ! -f "$stand_in" ] || grep -q "^$marker" "$stand_in"; then
  mkdir -p "$cache_dir"
  tmp=$(mktemp "$stand_in.XXXXXX")
  cat >"$tmp" <<EOF
$marker (written by scripts/sanity.sh; ansible-test runs it as get-pip.py)
"""Install pip $pip_version from PyPI's wheel into the running (pip-less) interpreter."""
import hashlib
import json
import os
import sys
import tempfile
import urllib.request

VERSION = "$pip_version"


def fetch(url):
    with urllib.request.urlopen(url, timeout=120) as resp:
        return resp.read()


def main(argv):
    # PEP 691 JSON form of PyPI's simple index (the legacy JSON API is not reachable here).
    req = urllib.request.Request("https://pypi.org/simple/pip/",
                                 headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    meta = json.loads(fetch(req))
    name = "pip-%s-py3-none-any.whl" % VERSION
    wheel = [f for f in meta["files"] if f["filename"] == name][0]
    data = fetch(wheel["url"])
    if hashlib.sha256(data).hexdigest() != wheel["hashes"]["sha256"]:
        sys.exit("get-pip stand-in: sha256 of %s does not match PyPI" % wheel["filename"])
    tmpdir = tempfile.mkdtemp(prefix="lanyard-get-pip-")
    path = os.path.join(tmpdir, wheel["filename"])
    with open(path, "wb") as fh:
        fh.write(data)
    sys.path.insert(0, path)
    # get-pip.py options that pip itself does not know.
    args = [a for a in argv if a not in ("--no-setuptools", "--no-wheel")]
    args = [path if a == "pip==%s" % VERSION else a for a in args]
    from pip._internal.cli.main import main as pip_main
    return pip_main(["install"] + args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
EOF
  mv "$tmp" "$stand_in"
fi

# ansible-test needs its working directory inside .../ansible_collections/<ns>/<name>/ and resolves
# symlinks (so build/collections/... -> the repo does not work for it). Test a copy of the working
# tree instead: every tracked and untracked-but-not-ignored file, in a fresh directory per run (so
# parallel runs never share one).
work=$(mktemp -d "${TMPDIR:-/tmp}/lanyard-sanity.XXXXXX")
trap 'rm -rf "$work"' EXIT
coll="$work/ansible_collections/lanyard/machine_id"
mkdir -p "$coll"
git -C "$top" ls-files -z --cached --others --exclude-standard \
  | (cd "$top" && xargs -0 -r sh -c 'for f; do [ -e "$f" ] && printf "%s\0" "$f"; done' sh) \
  | tar -C "$top" --null -T - -cf - | tar -C "$coll" -xf -
cd "$coll"
pyver=$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
"$venv/bin/ansible-test" sanity --venv --python "$pyver" --color no "$@"
