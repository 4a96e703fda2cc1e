#!/usr/bin/env bash
# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
#
# Every test (make test / .ci/run), in two pytest processes that run at the same time:
#   lane A: the tests that spend their time waiting on Teleport (CA rotations step by step) and on systemd
#           (crash and restart loops on a rolled-out host, a start that waits out TimeoutStartSec on a full
#           storage, tbot's own start-up) -- mostly idle CPU -- the tbot takeovers, and the controller matrix (unit
#           tests, sanity and a rollout on other ansible-core versions);
#   lane B: everything else (unit, real bed, molecule, rollouts, sanity, lint).
# Each lane has its own test bed (free ports, own temp dirs) and its own test hosts (names differ per module).
# Lane B prints as it goes; lane A's output follows at the end. Non-zero when either lane fails; a lane that
# collects no test is a failure (pytest exit 5).
#
#   scripts/test.sh [pytest args...]       e.g. scripts/test.sh -ra --durations=40
#   LANYARD_TEST_LANES=1 scripts/test.sh   one pytest process, as before
set -uo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"
py=${PYTHON:-python3}
LANE_A=(tests/integration/agent/test_rotation_real.py tests/integration/agent/test_crash_real.py
        tests/integration/collection/test_controller_matrix.py
        tests/integration/rollout/test_adopt_tbot.py tests/integration/rollout/test_adopt_tbot_edges.py)

if [ "${LANYARD_TEST_LANES:-2}" = 1 ]; then
  exec "$py" -m pytest tests "$@"
fi

log_dir=$(mktemp -d "${TMPDIR:-/tmp}/lanyard-lanes.XXXXXX")
ignores=()
for f in "${LANE_A[@]}"; do
  ignores+=(--ignore "$f")
done

start=$(date +%s)
"$py" -m pytest "${LANE_A[@]}" "$@" >"$log_dir/lane-a.log" 2>&1 &
pid_a=$!
# lane A never outlives the run (a timeout or ^C on lane B)
trap 'kill -INT "$pid_a" 2>/dev/null; sleep 5; kill "$pid_a" 2>/dev/null; cat "$log_dir/lane-a.log"; exit 130' INT TERM
"$py" -m pytest tests "${ignores[@]}" "$@"
rc_b=$?
echo "[test] lane B (everything else) exited $rc_b after $(( $(date +%s) - start ))s; waiting for lane A" >&2
wait "$pid_a"
rc_a=$?
echo "================================ lane A: ${LANE_A[*]} ================================"
cat "$log_dir/lane-a.log"
echo "[test] lane A exited $rc_a, lane B $rc_b; both done after $(( $(date +%s) - start ))s" >&2
rm -rf "$log_dir"
for rc in "$rc_a" "$rc_b"; do
  if [ "$rc" -eq 5 ]; then
    echo "[test] a lane collected no tests: failing" >&2
    exit 5
  fi
done
if [ "$rc_a" -ne 0 ]; then exit "$rc_a"; fi
exit "$rc_b"
