# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""promtool (Debian's ``prometheus`` package) for the metrics and alert rule tests: ``check metrics`` on an
exposition, ``test rules`` on a test file, and the alerts a rule is expected to raise for given labels (the
rules' annotations use ``{{ $labels.NAME }}`` only, so the expected text is their templates filled in)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Dict, List

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "roles" / "machine_id" / "files" / "prometheus" / "machine-id-agent.rules.yml"
INSTALL = "apt-get install -y --no-install-recommends prometheus"
_LABEL = re.compile(r"\{\{\s*\$labels\.([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is missing: run as root `%s` (Debian's prometheus package; scripts/bootstrap.sh "
                    "installs it)" % INSTALL, pytrace=False)
    return path


def check_metrics(text: str) -> subprocess.CompletedProcess:
    """``promtool check metrics`` reads the exposition on stdin; rc 0 and no output means no lint problem."""
    return subprocess.run([promtool(), "check", "metrics"], input=text, capture_output=True, text=True,
                          timeout=60, check=False)


def test_rules(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([promtool(), "test", "rules", str(path)], capture_output=True, text=True,
                          timeout=120, check=False, cwd=str(Path(path).parent))


test_rules.__test__ = False  # a helper, not a pytest test


def rules() -> Dict[str, dict]:
    doc = yaml.safe_load(RULES.read_text())
    return {r["alert"]: r for g in doc["groups"] for r in g["rules"] if "alert" in r}


def render(template: str, labels: Dict[str, str]) -> str:
    out = _LABEL.sub(lambda m: labels.get(m.group(1), ""), template)
    assert "{{" not in out, "an annotation uses more than $labels: %r" % template
    return out


def expected(alertname: str, labels: Dict[str, str]) -> dict:
    """One exp_alerts entry: the series' labels (``__name__`` dropped, as an alert does) plus the rule's."""
    rule = rules()[alertname]
    lab = {k: v for k, v in labels.items() if k != "__name__"}
    lab.update(rule.get("labels") or {})
    return {"exp_labels": lab, "exp_annotations": {k: render(v, lab) for k, v in (rule.get("annotations") or {}).items()}}


def series(name: str, labels: Dict[str, str], values: str) -> dict:
    lab = ", ".join('%s="%s"' % (k, str(v).replace("\\", "\\\\").replace('"', '\\"')) for k, v in labels.items())
    return {"series": "%s{%s}" % (name, lab), "values": values}


class _Dumper(yaml.SafeDumper):
    """Block sequences indented under their key, as the collection's yamllint (ansible-lint) wants them."""

    def increase_indent(self, flow=False, indentless=False):
        return super().increase_indent(flow, False)


def dump(doc: dict) -> str:
    return yaml.dump(doc, Dumper=_Dumper, sort_keys=False, width=100, explicit_start=True)


def test_file(tests: List[dict], rules_path: Path = RULES) -> dict:
    return {"rule_files": [str(rules_path)], "evaluation_interval": "1m", "tests": tests}


test_file.__test__ = False
