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
      - Path of the kubeconfig file to use.
      - When not set, the files listed in the E(KUBECONFIG) environment variable are read and merged like
        C(kubectl) does (the first file that defines a name or the current context wins), else C(~/.kube/config).
      - When no kubeconfig is found and O(host) is not set, the in-cluster service account is used
        (E(KUBERNETES_SERVICE_HOST), E(KUBERNETES_SERVICE_PORT) and the mounted token and CA).
      - Supported in the kubeconfig are inline C(*-data) fields, file paths (relative ones are relative to the
        kubeconfig file), C(tls-server-name) (as written by Teleport), C(proxy-url), C(insecure-skip-tls-verify),
        bearer C(token) and C(tokenFile), client certificate and key, basic auth, C(as) impersonation and C(exec)
        credential plugins (for example C(tbot kube credentials)); the removed C(auth-provider) is not.
      - Mutually exclusive with O(host).
    type: path
  context:
    description:
      - Name of the kubeconfig context to use. Defaults to the kubeconfig's C(current-context).
      - Mutually exclusive with O(host).
    type: str
  host:
    description:
      - URL of the Kubernetes API server, for example V(https://203.0.113.10:6443). C(https://) is added when no
        scheme is given.
      - When set, no kubeconfig is read; authenticate with O(api_key) or O(client_cert) and O(client_key).
    type: str
  api_key:
    description:
      - Bearer token for O(host). Never shown in output or logs.
      - Requires O(host).
    type: str
  client_cert:
    description:
      - Path of a PEM client certificate for O(host). Requires O(host) and O(client_key).
    type: path
  client_key:
    description:
      - Path of the PEM private key of O(client_cert).
    type: path
  ca_cert:
    description:
      - Path of the PEM CA bundle that signs the API server's certificate.
      - Overrides the kubeconfig's C(certificate-authority) or C(certificate-authority-data).
    type: path
  validate_certs:
    description:
      - Whether to verify the API server's TLS certificate. V(false) also overrides the kubeconfig.
      - Only set to V(false) on a throw-away test cluster.
    type: bool
    default: true
  request_timeout:
    description:
      - Seconds to wait for each answer from the API server.
    type: int
    default: 30
requirements:
  - The Python library C(requests) on the host that runs the module (usually the controller, with C(delegate_to=localhost)).
notes:
  - Credentials found in the kubeconfig (tokens, passwords, private keys, credentials returned by an exec plugin)
    are added to the values Ansible hides from all output.
  - Inline certificate data is written to files with mode 0600 in a private temporary directory for the duration of
    the task and then deleted.
"""
