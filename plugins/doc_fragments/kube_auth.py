# -*- coding: utf-8 -*-
# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Connection options shared by the kube_* modules (the argument spec is in module_utils/_kube_config.py)."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type


class ModuleDocFragment(object):

    DOCUMENTATION = r"""
options:
  kubeconfig:
    description:
      - The kubeconfig to use - a path, several paths separated by V(:) (merged like E(KUBECONFIG)), or the
        kubeconfig itself as a dict (an in-memory kubeconfig, for example read with P(ansible.builtin.file#lookup)
        and C(from_yaml) or built from a vault; file paths in it should be absolute).
      - Can also be specified via the E(K8S_AUTH_KUBECONFIG) environment variable (a path or a V(:) separated list).
      - When neither is set, the files listed in the E(KUBECONFIG) environment variable are read and merged like
        C(kubectl) does (the first file that defines a name or the current context wins), else C(~/.kube/config).
      - When no kubeconfig is found and O(host) is not set, the in-cluster service account is used
        (E(KUBERNETES_SERVICE_HOST), E(KUBERNETES_SERVICE_PORT) and the mounted token and CA).
      - Supported in the kubeconfig are inline C(*-data) fields, file paths (relative ones are relative to the
        kubeconfig file), C(tls-server-name) (as written by Teleport), C(proxy-url), C(insecure-skip-tls-verify),
        bearer C(token) and C(tokenFile), client certificate and key, basic auth, C(as) impersonation and C(exec)
        credential plugins (for example C(tbot kube credentials)); the removed C(auth-provider) is not.
      - Credentials in a dict kubeconfig are hidden from all output like those read from a file.
      - Mutually exclusive with O(host).
    type: raw
  context:
    description:
      - Name of the kubeconfig context to use. Defaults to the kubeconfig's C(current-context).
      - Can also be specified via the E(K8S_AUTH_CONTEXT) environment variable.
      - Mutually exclusive with O(host).
    type: str
  host:
    description:
      - URL of the Kubernetes API server, for example V(https://203.0.113.10:6443). C(https://) is added when no
        scheme is given.
      - When set, no kubeconfig is read; authenticate with O(api_key) or O(client_cert) and O(client_key).
      - Can also be specified via the E(K8S_AUTH_HOST) environment variable.
    type: str
  api_key:
    description:
      - Bearer token for O(host). Never shown in output or logs.
      - Requires O(host).
      - Can also be specified via the E(K8S_AUTH_API_KEY) environment variable.
    type: str
  client_cert:
    description:
      - Path of a PEM client certificate for O(host). Requires O(host) and O(client_key).
      - Can also be specified via the E(K8S_AUTH_CERT_FILE) environment variable.
    type: path
  client_key:
    description:
      - Path of the PEM private key of O(client_cert).
      - Can also be specified via the E(K8S_AUTH_KEY_FILE) environment variable.
    type: path
  ca_cert:
    description:
      - Path of the PEM CA bundle that signs the API server's certificate.
      - Overrides the kubeconfig's C(certificate-authority) or C(certificate-authority-data).
      - Can also be specified via the E(K8S_AUTH_SSL_CA_CERT) environment variable.
    type: path
  validate_certs:
    description:
      - Whether to verify the API server's TLS certificate. V(false) also overrides the kubeconfig.
      - Can also be specified via the E(K8S_AUTH_VERIFY_SSL) environment variable (V(true)/V(false), V(yes)/V(no),
        V(1)/V(0)). When neither is set, certificates are verified unless the kubeconfig says
        C(insecure-skip-tls-verify).
      - Only set to V(false) on a throw-away test cluster.
    type: bool
  proxy:
    description:
      - URL of an HTTP proxy for the connection to the API server, for example V(http://proxy.example.com:3128)
        (HTTPS goes through it with C(CONNECT)). A password in the URL is never shown.
      - Overrides the kubeconfig's C(proxy-url) and the E(HTTPS_PROXY) environment variable, which are used
        otherwise (together with E(NO_PROXY)), as C(kubectl) does.
      - Can also be specified via the E(K8S_AUTH_PROXY) environment variable.
    type: str
  no_proxy:
    description:
      - Comma separated hosts, domains (V(.example.com) or V(example.com) also match subdomains), IP addresses
        and CIDRs (V(10.0.0.0/8)) that are reached without a proxy; V(*) matches everything.
      - Applies to the API server's address, whichever proxy would be used (O(proxy), the kubeconfig's
        C(proxy-url) or E(HTTPS_PROXY)).
      - Can also be specified via the E(K8S_AUTH_NO_PROXY) environment variable.
    type: str
  request_timeout:
    description:
      - Seconds to wait for each answer from the API server.
    type: int
    default: 30
requirements:
  - The Python library C(requests) on the host that runs the module (usually the controller, with
    C(delegate_to=localhost)); C(PyYAML) to read YAML kubeconfig files (JSON ones need nothing more).
notes:
  - Every option above that a task leaves unset is read from its C(K8S_AUTH_*) environment variable (the names
    the C(kubernetes.core) collection uses), on the host that runs the module. An option set in the task always
    wins, and a task that chooses how to connect keeps its choice - with any of O(host), O(api_key),
    O(client_cert) or O(client_key) set, E(K8S_AUTH_KUBECONFIG) and E(K8S_AUTH_CONTEXT) are not read; with
    O(kubeconfig) or O(context) set, E(K8S_AUTH_HOST), E(K8S_AUTH_API_KEY), E(K8S_AUTH_CERT_FILE) and
    E(K8S_AUTH_KEY_FILE) are not read.
  - Credentials found in the kubeconfig (tokens, passwords, private keys, credentials returned by an exec plugin)
    are added to the values Ansible hides from all output.
  - Inline certificate data is written to files with mode 0600 in a private temporary directory for the duration of
    the task and then deleted.
"""
