"""Shared fixtures. Privileged tests skip only where the machine cannot run them (not root,
no cgroup v2, no bcc); on this project's machines and in CI they always run."""

from __future__ import annotations

import os

import pytest


def _privileged_missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    try:
        from hostagent.cgroupfs import cgroup2_mount
        cgroup2_mount()
    except Exception as err:  # noqa: BLE001 - any reason is a reason to skip
        return f"no cgroup v2: {err}"
    try:
        import bcc  # noqa: F401
    except ImportError:
        return "bcc (python3-bpfcc) is not importable"
    return None


def pytest_collection_modifyitems(config, items):
    reason = _privileged_missing()
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
