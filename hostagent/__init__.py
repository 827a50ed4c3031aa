"""hostagent: kernel-enforced, identity-tagged egress control for Linux nodes."""

__version__ = "0.1.0"
