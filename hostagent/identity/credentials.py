"""Whether the node has Kubernetes credentials at all, answered without importing the
Kubernetes client library: that import costs about 0.4 s of an agent's start, which a node
outside any cluster (a VM under systemd) never needs."""

from __future__ import annotations

import os
from collections.abc import Mapping

SERVICE_HOST_ENV = "KUBERNETES_SERVICE_HOST"  # set by the kubelet in every pod's containers
NO_CREDENTIALS = (
    "no Kubernetes credentials: not running in a pod (KUBERNETES_SERVICE_HOST is not set) and "
    "no kubeconfig was given; set kubeconfig in the node configuration, or run as a DaemonSet "
    "with a service account")


def missing(kubeconfig: str | None, environ: Mapping[str, str] | None = None) -> str | None:
    """NO_CREDENTIALS when there is neither a kubeconfig nor a pod's environment; None when
    hostagent.identity.kube.make_api_client has something to try."""
    env = os.environ if environ is None else environ
    if kubeconfig is None and not env.get(SERVICE_HOST_ENV):
        return NO_CREDENTIALS
    return None
