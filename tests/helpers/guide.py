# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""What tests take verbatim from guide-machine-id-kubernetes.txt."""

# Step 1 of the guide, verbatim: the Teleport role the bot impersonates.
GUIDE_ROLE = """\
kind: role
metadata:
  name: machine-id-kube-role
version: v6
spec:
  allow:
    kubernetes_labels:
      '*': '*'
    kubernetes_resources:
      - kind: pod
        namespace: "*"
        name: "*"
    kubernetes_groups:
    - example
    kubernetes_users:
    - alice
"""
