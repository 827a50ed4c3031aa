"""Workload identity: what a cgroup path says (layout) and Kubernetes label selectors (labels).

Pure functions and frozen values, no I/O: callers bring the cgroup paths and the pod labels.
"""

from hostagent.identity.labels import (
    LabelSelector,
    Requirement,
    parse_label_selector,
    validate_label_key,
    validate_label_value,
)
from hostagent.identity.layout import CgroupIdentity, Driver, Kind, parse_cgroup_path, pod_uid_from_path

__all__ = [
    "CgroupIdentity",
    "Driver",
    "Kind",
    "LabelSelector",
    "Requirement",
    "parse_cgroup_path",
    "parse_label_selector",
    "pod_uid_from_path",
    "validate_label_key",
    "validate_label_value",
]
