"""Shared fixtures. Privileged tests skip only where they cannot run at all: without root (a
developer's laptop). As root, a machine without cgroup v2 or bcc has a broken set-up: the run
fails and says why, instead of passing with the real-kernel tests skipped."""

from __future__ import annotations

import os

import pytest


def privileged_unavailable() -> str | None:
    """The reason to skip real-kernel tests (None: run them); raises pytest.UsageError as root
    when what they need is missing."""
    if os.geteuid() != 0:
        return "needs root"
    problems = []
    try:
        from hostagent.cgroupfs import cgroup2_mount
        cgroup2_mount()
    except Exception as err:  # noqa: BLE001 - every reason is reported
        problems.append(f"no cgroup v2: {err}")
    try:
        import bcc  # noqa: F401
    except ImportError as err:
        problems.append(f"bcc (python3-bpfcc) is not importable: {err}")
    if problems:
        raise pytest.UsageError("running as root, but the real-kernel tests cannot run: "
                                + "; ".join(problems) + " (scripts/setup.sh sets this up)")
    return None


def pytest_collection_modifyitems(config, items):
    reason = privileged_unavailable()
    if reason is None:
        return
    marker = pytest.mark.skip(reason=f"privileged test: {reason}")
    for item in items:
        if "privileged" in item.keywords:
            item.add_marker(marker)


@pytest.fixture
def node():
    from tests.harness import TestNode

    n = TestNode()
    try:
        yield n
    finally:
        n.close()
