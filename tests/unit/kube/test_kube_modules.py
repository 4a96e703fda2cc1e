# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The modules as Ansible runs them: ansible-doc renders, argument rules, and secrets never reach output."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers.playbook import ansible_bin, run_playbook

MODULES = ("lanyard.machine_id.kube_role", "lanyard.machine_id.kube_rolebinding")
REPO = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize("module", MODULES)
def test_ansible_doc_renders(module):
    env = {"ANSIBLE_COLLECTIONS_PATH": str(REPO / "build" / "collections"), "ANSIBLE_NOCOLOR": "1",
           "PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin", "HOME": str(Path.home())}
    proc = subprocess.run([ansible_bin("ansible-doc"), "--json", module], capture_output=True, text=True, env=env,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)[module]["doc"]
    options = doc["options"]
    # Shared connection options come from the kube_auth doc fragment.
    for name in ("kubeconfig", "context", "host", "api_key", "client_cert", "client_key", "ca_cert",
                 "validate_certs", "request_timeout", "name", "namespace", "state", "labels"):
        assert name in options, name
    assert doc["attributes"]["check_mode"]["support"] == "full"
    text = subprocess.run([ansible_bin("ansible-doc"), module], capture_output=True, text=True, env=env, timeout=120,
                          check=False)
    assert text.returncode == 0 and "EXAMPLES" in text.stdout


def test_doc_options_match_the_argument_spec():
    sys.path.insert(0, str(REPO / "build" / "collections"))
    from ansible_collections.lanyard.machine_id.plugins.modules import kube_role, kube_rolebinding
    from ansible_collections.lanyard.machine_id.plugins.doc_fragments.kube_auth import ModuleDocFragment
    shared = yaml.safe_load(ModuleDocFragment.DOCUMENTATION)["options"]
    for mod in (kube_role, kube_rolebinding):
        docs = dict(shared)
        docs.update(yaml.safe_load(mod.DOCUMENTATION)["options"])
        spec = mod.argument_spec()
        assert set(docs) == set(spec), mod.__name__

        def compare(doc_opts, spec_opts, where):
            for name, opt in spec_opts.items():
                d = doc_opts[name]
                assert d.get("type", "str") == opt.get("type", "str"), (where, name)
                assert d.get("default") == opt.get("default"), (where, name)
                assert d.get("choices") == opt.get("choices"), (where, name)
                assert bool(d.get("required")) == bool(opt.get("required")), (where, name)
                assert d.get("elements") == opt.get("elements"), (where, name)
                if opt.get("options"):
                    compare(d["suboptions"], opt["options"], where + "." + name)
        compare(docs, spec, mod.__name__)


SECRET_TOKEN = "tok-" + "S3CR3T" * 8
SECRET_KEY = "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcw-KEYSECRET\n-----END PRIVATE KEY-----\n"
API_KEY = "api-key-" + "Z9" * 20


def _kubeconfig(tmp_path):
    doc = {"apiVersion": "v1", "kind": "Config", "current-context": "x",
           "clusters": [{"name": "dead", "cluster": {"server": "https://127.0.0.1:1"}}],
           "users": [{"name": "u", "user": {"token": SECRET_TOKEN,
                                            "client-certificate-data": base64.b64encode(b"CERT").decode(),
                                            "client-key-data": base64.b64encode(SECRET_KEY.encode()).decode()}}],
           "contexts": [{"name": "x", "context": {"cluster": "dead", "user": "u"}}]}
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(doc))
    return path


PLAY = """
- hosts: localhost
  gather_facts: false
  tasks:
    - name: role via kubeconfig
      lanyard.machine_id.kube_role:
        kubeconfig: "{{ kc }}"
        name: r
        namespace: demo
        rules: [{verbs: [get], resources: [pods], api_groups: [""]}]
        request_timeout: 3
      ignore_errors: true
    - name: binding via host and api_key
      lanyard.machine_id.kube_rolebinding:
        host: https://127.0.0.1:1
        api_key: "{{ lookup('env', 'LANYARD_TEST_API_KEY') }}"
        name: rb
        namespace: demo
        role: r
        groups: [example]
        request_timeout: 3
      ignore_errors: true
    - name: binding without namespace
      lanyard.machine_id.kube_rolebinding:
        kubeconfig: "{{ kc }}"
        name: rb
        role: r
      ignore_errors: true
    - name: role ref change of kind
      lanyard.machine_id.kube_rolebinding:
        kubeconfig: "{{ kc }}"
        kind: ClusterRoleBinding
        name: rb
        role: r
      ignore_errors: true
"""


def test_failures_are_one_line_and_never_show_credentials(tmp_path):
    kc = _kubeconfig(tmp_path)
    # The key goes in through the environment: -e values are echoed by ansible-playbook -vvvv itself.
    run = run_playbook(tmp_path, PLAY, extra_vars={"kc": str(kc)}, diff=True, verbosity=4,
                       env={"LANYARD_TEST_API_KEY": API_KEY})
    role = run.result("role via kubeconfig")
    assert role["_status"] == "failed"
    assert "cannot read Role demo/r in cluster 'dead' (https://127.0.0.1:1)" in role["msg"]
    assert "Traceback" not in role["msg"] and "\n" not in role["msg"]
    rb = run.result("binding via host and api_key")
    assert rb["_status"] == "failed" and "cannot read RoleBinding demo/rb" in rb["msg"]
    assert "namespace" in run.result("binding without namespace")["msg"]
    assert "can only reference a ClusterRole" in run.result("role ref change of kind")["msg"]
    everything = run.stdout + json.dumps(run.results)
    for secret in (SECRET_TOKEN, "KEYSECRET", API_KEY, base64.b64encode(SECRET_KEY.encode()).decode()):
        assert secret not in everything
    # api_key is masked wherever the invocation is shown (ansible-core 2.21 no longer echoes module_args at -vvvv)
    assert "VALUE_SPECIFIED_IN_NO_LOG_PARAMETER" in everything or '"api_key"' not in everything
    assert not list(Path("/tmp").glob("lanyard-kube-*/client.key"))
