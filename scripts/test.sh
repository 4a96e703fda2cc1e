#!/usr/bin/env bash
# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
#
# Every test (make test / .ci/run): one pytest run spread over several worker processes (pytest-xdist), each
# taking one test file at a time (--dist loadfile), the longest files first: tests/conftest.py orders them, and
# --no-loadscope-reorder keeps that order (xdist would otherwise start with the files that hold the most tests,
# the quick unit-test files, and leave the long real-bed files for the end).
# Much of the suite waits -- on Teleport (CA rotations step by step), on systemd (crash and restart loops, a
# start that waits out TimeoutStartSec on a full storage) and on certificates expiring -- so more workers than
# cores keep the machine busy. Each worker that needs the real test bed starts its own (free ports, own temp
# dirs); test hosts have names of their own per module, and what several workers build at once (the test-bed
# binaries, host images, agent wheels, the controller matrix's venvs) is built once, under a lock.
# Non-zero on any failure; "no tests collected" is pytest's exit 5, which .ci/run reports as a failure.
#
#   scripts/test.sh [pytest args...]        e.g. scripts/test.sh -ra --durations=40
#   LANYARD_TEST_WORKERS=4 scripts/test.sh  more or fewer workers (default 3)
#   LANYARD_TEST_WORKERS=1 scripts/test.sh  one pytest process, no xdist
set -uo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"
py=${PYTHON:-python3}
workers=${LANYARD_TEST_WORKERS:-3}
case "$workers" in
  ''|*[!0-9]*|0) echo "[test] LANYARD_TEST_WORKERS=$workers: give a number of worker processes, 1 or more" >&2; exit 2 ;;
esac

start=$(date +%s)
if [ "$workers" = 1 ]; then
  "$py" -m pytest tests "$@"
else
  "$py" -m pytest -n "$workers" --dist loadfile --no-loadscope-reorder tests "$@"
fi
rc=$?
echo "[test] pytest ($workers worker(s)) exited $rc after $(( $(date +%s) - start ))s" >&2
exit "$rc"
