"""Egress policies: the model, loading/validation from YAML, and cgroup path selectors.

Pipeline: load (YAML -> validated model, all errors at once) -> compile (model -> kernel maps,
in hostagent.policy.compile). Only the model and loaders are re-exported here; the compiler is
imported from its own module so loading policies never needs the BPF toolchain.
"""

from hostagent.policy.load import (
    API_VERSION,
    KIND,
    MAX_FILE_BYTES,
    POLICY_SUFFIXES,
    PolicyErrors,
    load_policy_dir,
    load_policy_file,
    load_policy_text,
)
from hostagent.policy.model import (
    CIDRPeer,
    EgressRule,
    FQDNPatternPeer,
    FQDNPeer,
    Mode,
    Peer,
    Policy,
    PortRange,
    Protocol,
    Selector,
)
from hostagent.policy.selector import (
    compile_cgroup_pattern,
    matches,
    normalize_cgroup_pattern,
    overlap_example,
    patterns_overlap,
    specificity,
)

__all__ = [
    "API_VERSION",
    "KIND",
    "MAX_FILE_BYTES",
    "POLICY_SUFFIXES",
    "CIDRPeer",
    "EgressRule",
    "FQDNPatternPeer",
    "FQDNPeer",
    "Mode",
    "Peer",
    "Policy",
    "PolicyErrors",
    "PortRange",
    "Protocol",
    "Selector",
    "compile_cgroup_pattern",
    "load_policy_dir",
    "load_policy_file",
    "load_policy_text",
    "matches",
    "normalize_cgroup_pattern",
    "overlap_example",
    "patterns_overlap",
    "specificity",
]
