"""Node config: converters, the YAML loader, overrides and the shipped default file (pure unit tests)."""

from __future__ import annotations

import dataclasses
import importlib
import ipaddress
import math
import re
import sys
import types
from pathlib import Path

import pytest

from hostagent import converters
from hostagent.config import (
    NAT64_PREFIX,
    DefaultAction,
    MetadataConfig,
    NodeConfig,
    default_config,
    load_config,
)
from hostagent.errors import ConfigError, HostAgentError

PACKAGED = Path(__file__).resolve().parent.parent / "packaging" / "hostagent.yaml"
SELECTOR = "hostagent.policy.selector"


def _stub_normalize(s: str) -> str:
    if not s.startswith("/") or "\n" in s:
        raise ValueError(repr(s))
    return s


@pytest.fixture(autouse=True)
def selector_module(monkeypatch):
    """The real hostagent.policy.selector when it exists, else a minimal stand-in.

    normalize_cgroup_pattern() is written in parallel with this module; the config only needs its
    contract (str -> str, ValueError(repr(s)) on a bad pattern).
    """
    try:
        return importlib.import_module(SELECTOR)
    except ImportError:
        stub = types.ModuleType(SELECTOR)
        stub.normalize_cgroup_pattern = _stub_normalize
        monkeypatch.setitem(sys.modules, SELECTOR, stub)
        return stub


def write(tmp_path: Path, text: str, name: str = "hostagent.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def load_text(tmp_path: Path, text: str) -> NodeConfig:
    return load_config(write(tmp_path, text))


def without_source(config: NodeConfig) -> NodeConfig:
    return dataclasses.replace(config, source=None)


# ---------------------------------------------------------------------------------------------
# converters


@pytest.mark.parametrize("value, expected", [
    ("127.0.0.1:9402", ("127.0.0.1", 9402)),
    ("[::1]:9402", ("::1", 9402)),
    ("[::]:0", ("::", 0)),
    ("localhost:0", ("localhost", 0)),
    ("0.0.0.0:65535", ("0.0.0.0", 65535)),
    ("metrics.node-1.example:80", ("metrics.node-1.example", 80)),
])
def test_host_port_accepts(value, expected):
    assert converters.host_port(value) == expected


@pytest.mark.parametrize("value", [
    "127.0.0.1", "localhost", "[::1]", "127.0.0.1:", ":9402", "127.0.0.1:65536", "127.0.0.1:99999",
    "127.0.0.1:-1", "127.0.0.1:+80", "127.0.0.1: 80", "127.0.0.1:http", "::1:9402", "[::1]9402",
    "[127.0.0.1]:80", "[nope]:80", "256.0.0.1:80", "bad_host:80", "-bad:80", "", 9402, None, True,
    ["127.0.0.1:9402"],
])
def test_host_port_rejects(value):
    with pytest.raises(ValueError) as info:
        converters.host_port(value)
    assert str(info.value).startswith(repr(value))


@pytest.mark.parametrize("value, expected", [
    ("10.0.0.0/8", "10.0.0.0/8"),
    ("169.254.169.254", "169.254.169.254/32"),
    ("169.254.169.254/32", "169.254.169.254/32"),
    ("0.0.0.0/0", "0.0.0.0/0"),
    ("fd00:ec2::254", "fd00:ec2::254/128"),
    ("FD00:EC2::254/128", "fd00:ec2::254/128"),
    ("2001:db8::/32", "2001:db8::/32"),
    ("::/0", "::/0"),
])
def test_cidr_accepts(value, expected):
    assert converters.cidr(value) == ipaddress.ip_network(expected)


@pytest.mark.parametrize("value, reason", [
    ("10.0.0.1/8", "host bits set (did you mean 10.0.0.0/8?)"),
    ("2001:db8::1/32", "host bits set"),
    ("10.0.0.0/33", "not an IP address or CIDR"),
    ("10.0.0.0/255.0.0.0", "prefix length"),
    ("10.0.0.0/", "prefix length"),
    ("10.0.0.0/-1", "prefix length"),
    ("10.0.0", "not an IP"),
    ("010.0.0.1", "not an IP"),
    ("fe80::1%eth0", "scoped"),
    (" 10.0.0.1", "not an IP"),
    ("example.com", "not an IP"),
    ("", "not an IP"),
    (167772160, "expected a string"),
    (None, "expected a string"),
])
def test_cidr_rejects(value, reason):
    with pytest.raises(ValueError) as info:
        converters.cidr(value)
    assert str(info.value).startswith(repr(value))
    assert reason in str(info.value)


@pytest.mark.parametrize("value, expected", [
    ("/", "/"),
    ("/var/lib/hostagent", "/var/lib/hostagent"),
    ("/var/lib/hostagent/", "/var/lib/hostagent"),
    ("//var//lib/./hostagent", "/var/lib/hostagent"),
    ("/a b/c", "/a b/c"),
])
def test_absolute_path_accepts(value, expected):
    assert converters.absolute_path(value) == expected


@pytest.mark.parametrize("value", ["", "var/lib", "./x", "~/x", "/a/../b", "/..", "/a\0b", 1, None, True])
def test_absolute_path_rejects(value):
    with pytest.raises(ValueError, match=re.escape(repr(value))):
        converters.absolute_path(value)


@pytest.mark.parametrize("value", [True, False])
def test_boolean_accepts(value):
    assert converters.boolean(value) is value


@pytest.mark.parametrize("value", ["true", "false", "yes", 1, 0, None, 1.0, []])
def test_boolean_rejects(value):
    with pytest.raises(ValueError, match=re.escape(repr(value))):
        converters.boolean(value)


@pytest.mark.parametrize("value, hi", [(1, None), (262144, None), (2**40, None), (10, 10)])
def test_positive_int_accepts(value, hi):
    assert converters.positive_int(value, hi) == value


@pytest.mark.parametrize("value, hi", [
    (0, None), (-1, None), (11, 10), (True, None), (1.0, None), ("5", None), (None, None),
])
def test_positive_int_rejects(value, hi):
    with pytest.raises(ValueError, match=re.escape(repr(value))):
        converters.positive_int(value, hi)


@pytest.mark.parametrize("value, expected", [(0.1, 0.1), (2, 2.0), (2.5, 2.5), (3600, 3600.0)])
def test_seconds_accepts(value, expected):
    result = converters.seconds(value, 0.1, 3600)
    assert result == expected and type(result) is float


@pytest.mark.parametrize("value", [0, 0.09, 3600.5, -1, math.inf, math.nan, True, "2", None])
def test_seconds_rejects(value):
    with pytest.raises(ValueError, match=re.escape(repr(value))):
        converters.seconds(value, 0.1, 3600)


def test_one_of():
    convert = converters.one_of(["allow", "deny"])
    assert convert("deny") == "deny"
    for bad in ["Deny", "DENY", "audit", "", None, 1]:
        with pytest.raises(ValueError, match=re.escape(repr(bad)) + r".*allow, deny"):
            convert(bad)


@pytest.mark.parametrize("value", ["debug", "info", "warning", "error"])
def test_log_level_accepts(value):
    assert converters.log_level(value) == value


@pytest.mark.parametrize("value", ["warn", "INFO", "critical", "", 10, None])
def test_log_level_rejects(value):
    with pytest.raises(ValueError, match=re.escape(repr(value))):
        converters.log_level(value)


# ---------------------------------------------------------------------------------------------
# defaults and the shipped file


def test_default_action_numbers_are_the_kernel_abi():
    assert {a.name: a.value for a in DefaultAction} == {"ALLOW": 1, "AUDIT": 2, "DENY": 3}


def test_no_path_is_defaults():
    assert load_config(None) == default_config()
    assert default_config().source is None


def test_default_config_values():
    config = default_config()
    assert config.cgroup_root == "auto"
    assert config.default_action is DefaultAction.ALLOW
    assert config.metrics_listen == ("127.0.0.1", 9402)
    assert config.metadata.exempt == ("/system.slice/**",)
    assert set(map(str, config.metadata.endpoints)) == {
        "169.254.169.254/32", "169.254.170.2/32", "169.254.170.23/32", "169.254.169.123/32",
        "fd00:ec2::254/128", "fd00:ec2::23/128", "fd20:ce::254/128", "100.100.100.200/32",
        "168.63.129.16/32",
    }
    assert config.metadata.nat64 is True


def test_default_exempt_is_already_normalised(selector_module):
    for pattern in default_config().metadata.exempt:
        assert selector_module.normalize_cgroup_pattern(pattern) == pattern


@pytest.mark.parametrize("text", ["", "\n", "# only a comment\n", "---\n", "{}\n"])
def test_empty_file_is_defaults(tmp_path, text):
    config = load_text(tmp_path, text)
    assert without_source(config) == default_config()
    assert config.source == str(tmp_path / "hostagent.yaml")


def test_packaged_file_is_defaults():
    config = load_config(PACKAGED)
    assert config.source == str(PACKAGED)
    assert without_source(config) == default_config()


def test_packaged_file_lists_endpoints_in_code_order():
    # Same set is checked above; same order keeps the two lists easy to compare by eye.
    assert load_config(PACKAGED).metadata.endpoints == default_config().metadata.endpoints


def test_packaged_file_sets_every_key():
    text = PACKAGED.read_text()
    for key in ["cgroupRoot", "bpffsDir", "stateDir", "policyDir", "defaultAction", "metadata",
                "endpoints", "exempt", "nat64", "metrics", "listen", "eventLog", "events", "allow",
                "resyncInterval", "limits", "maxRules", "maxCgroups", "logLevel"]:
        assert re.search(rf"^\s*{key}:", text, re.M), key


def test_blocked_networks_adds_nat64_spelling():
    meta = MetadataConfig(
        endpoints=(ipaddress.ip_network("169.254.169.254/32"), ipaddress.ip_network("10.0.0.0/8"),
                   ipaddress.ip_network("fd00:ec2::254/128")),
        exempt=(), nat64=True)
    assert NAT64_PREFIX == ipaddress.ip_network("64:ff9b::/96")
    assert meta.blocked_networks() == meta.endpoints + (
        ipaddress.ip_network("64:ff9b::a9fe:a9fe/128"), ipaddress.ip_network("64:ff9b::a00:0/104"))
    assert dataclasses.replace(meta, nat64=False).blocked_networks() == meta.endpoints


# ---------------------------------------------------------------------------------------------
# partial files: each sets some keys, the rest keep their defaults


def _networks(*cidrs):
    return tuple(ipaddress.ip_network(c) for c in cidrs)


@pytest.mark.parametrize("text, changes", [
    ("cgroupRoot: /sys/fs/cgroup/kubepods.slice/\n", {"cgroup_root": "/sys/fs/cgroup/kubepods.slice"}),
    ("cgroupRoot: auto\n", {}),
    ("bpffsDir: /run/bpf/ha\nstateDir: /srv/state\n", {"bpffs_dir": "/run/bpf/ha", "state_dir": "/srv/state"}),
    ("policyDir: /etc/p\n", {"policy_dir": "/etc/p"}),
    ("defaultAction: deny\n", {"default_action": DefaultAction.DENY}),
    ("defaultAction: audit\n", {"default_action": DefaultAction.AUDIT}),
    ("metrics: {listen: '[::1]:0'}\n", {"metrics_listen": ("::1", 0)}),
    ("metrics: {listen: ''}\n", {"metrics_listen": None}),
    ("metrics: {listen: null}\n", {"metrics_listen": None}),
    ("metrics:\n  listen:\n", {"metrics_listen": None}),
    ("metrics:\n", {}),
    ("metrics: {}\n", {}),
    ("eventLog: '-'\n", {"event_log": "-"}),
    ("eventLog: ''\n", {"event_log": None}),
    ("eventLog: null\n", {"event_log": None}),
    ("eventLog: /tmp/e.jsonl\n", {"event_log": "/tmp/e.jsonl"}),
    ("events: {allow: true}\n", {"emit_allow_events": True}),
    ("events: {allow: yes}\n", {"emit_allow_events": True}),  # YAML 1.1 spelling of true
    ("resyncInterval: 5\n", {"resync_interval": 5.0}),
    ("resyncInterval: 0.1\n", {"resync_interval": 0.1}),
    ("limits: {maxRules: 1024}\n", {"max_rules": 1024}),
    ("limits:\n  maxCgroups: 10\n", {"max_cgroups": 10}),
    ("logLevel: debug\n", {"log_level": "debug"}),
])
def test_partial_file(tmp_path, text, changes):
    assert without_source(load_text(tmp_path, text)) == dataclasses.replace(default_config(), **changes)


@pytest.mark.parametrize("text, changes", [
    ("metadata: {nat64: false}\n", {"nat64": False}),
    ("metadata:\n", {}),
    ("metadata: {exempt: []}\n", {"exempt": ()}),
    ("metadata: {endpoints: []}\n", {"endpoints": ()}),
    ("metadata:\n  endpoints: [10.0.0.1, 'fd00::/8']\n", {"endpoints": _networks("10.0.0.1/32", "fd00::/8")}),
    ("metadata:\n  exempt:\n    - cgroupPath: /a\n    - {cgroupPath: '/b/**'}\n", {"exempt": ("/a", "/b/**")}),
])
def test_partial_metadata(tmp_path, text, changes):
    config = load_text(tmp_path, text)
    expected = dataclasses.replace(default_config().metadata, **changes)
    assert without_source(config) == dataclasses.replace(default_config(), metadata=expected)


def test_exempt_goes_through_normalize_cgroup_pattern(tmp_path, monkeypatch):
    stub = types.ModuleType(SELECTOR)
    stub.normalize_cgroup_pattern = lambda s: s.rstrip("/") + "!"
    monkeypatch.setitem(sys.modules, SELECTOR, stub)
    config = load_text(tmp_path, "metadata: {exempt: [{cgroupPath: /a/}]}\n")
    assert config.metadata.exempt == ("/a!",)


# ---------------------------------------------------------------------------------------------
# rejected files: message, file and line


def rejected(tmp_path: Path, text: str) -> ConfigError:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.path == str(path)
    return info.value


@pytest.mark.parametrize("text, line, key, allowed", [
    ("logLevel: info\npolicydir: /x\n", 2, "policydir", "cgroupRoot, bpffsDir, stateDir"),
    ("metadata:\n  nat64: true\n  endpoint: []\n", 3, "metadata.endpoint", "endpoints, exempt, nat64"),
    ("metrics:\n  listen: ''\n  port: 1\n", 3, "metrics.port", "listen"),
    ("events: {allow: false, deny: true}\n", 1, "events.deny", "allow"),
    ("limits:\n\n  maxRule: 5\n", 3, "limits.maxRule", "maxRules, maxCgroups"),
    ("metadata:\n  exempt:\n    - cgroupPath: /a\n      uid: 0\n", 4, "metadata.exempt[0].uid", "cgroupPath"),
])
def test_unknown_key(tmp_path, text, line, key, allowed):
    err = rejected(tmp_path, text)
    assert err.line == line
    assert err.key == key
    msg = str(err)
    assert msg.startswith(f"{tmp_path / 'hostagent.yaml'}:{line}: {key}: unknown key")
    assert allowed in msg


@pytest.mark.parametrize("text, line, fragment", [
    # wrong types
    ("cgroupRoot: relative/path\n", 1, "cgroupRoot: 'relative/path': expected \"auto\" or an absolute path"),
    ("cgroupRoot: 5\n", 1, "cgroupRoot: 5: expected an absolute path, got integer"),
    ("bpffsDir:\n", 1, "bpffsDir: None: expected an absolute path, got null"),
    ("stateDir: [a]\n", 1, "stateDir: expected a single value, got a list"),
    ("policyDir: {a: 1}\n", 1, "policyDir: expected a single value, got a mapping"),
    ("defaultAction: block\n", 1, "defaultAction: 'block': expected one of allow, audit, deny"),
    ("defaultAction: DENY\n", 1, "expected one of allow, audit, deny"),
    ("metadata: [a]\n", 1, "metadata: expected a mapping, got a list"),
    ("metadata: true\n", 1, "metadata: expected a mapping, got True"),
    ("metadata:\n  endpoints: 10.0.0.0/8\n", 2, "metadata.endpoints: expected a list, got '10.0.0.0/8'"),
    ("metadata:\n  endpoints:\n", 2, "expected a list, got null (write [] for an empty list)"),
    ("metadata:\n  endpoints:\n    - 10.0.0.0/8\n    - 10.0.0.1/8\n", 4,
     "metadata.endpoints[1]: '10.0.0.1/8': host bits set (did you mean 10.0.0.0/8?)"),
    ("metadata:\n  endpoints:\n    - 10.0.0.1\n    - 10.0.0.1/32\n", 4,
     "metadata.endpoints[1]: duplicate entry '10.0.0.1/32'"),
    ("metadata:\n  endpoints: [1.2.3.4, 5]\n", 2, "metadata.endpoints[1]: 5: expected a string CIDR"),
    ("metadata:\n  exempt: /system.slice/**\n", 2, "metadata.exempt: expected a list"),
    ("metadata:\n  exempt:\n    - /system.slice/**\n", 3,
     "metadata.exempt[0]: expected a mapping with key cgroupPath, got '/system.slice/**'"),
    ("metadata:\n  exempt:\n    - {}\n", 3, "metadata.exempt[0]: missing key cgroupPath"),
    ("metadata:\n  exempt:\n    -\n", 3, "metadata.exempt[0]: expected a mapping with key cgroupPath, got null"),
    ("metadata:\n  exempt:\n    - cgroupPath: 7\n", 3,
     "metadata.exempt[0].cgroupPath: 7: expected a string cgroup path pattern"),
    ("metadata:\n  exempt:\n    - cgroupPath: /a\n    - cgroupPath: /a\n", 4, "metadata.exempt[1]: duplicate entry"),
    ("metadata: {nat64: 'false'}\n", 1, "metadata.nat64: 'false': expected true or false, got string"),
    ("metadata:\n  nat64: 1\n", 2, "metadata.nat64: 1: expected true or false"),
    ("metrics: {listen: 9402}\n", 1, "metrics.listen: 9402: expected a string HOST:PORT, got integer"),
    ("metrics:\n  listen: 127.0.0.1\n", 2, "metrics.listen: '127.0.0.1': missing :PORT"),
    ("metrics:\n  listen: 127.0.0.1:70000\n", 2, "port must be a number from 0 to 65535"),
    ("metrics: '127.0.0.1:9402'\n", 1, "metrics: expected a mapping"),
    ("eventLog: events.jsonl\n", 1, "eventLog: 'events.jsonl': not an absolute path"),
    ("eventLog: false\n", 1, "eventLog: False: expected an absolute path"),
    ("events: {allow: 'no'}\n", 1, "events.allow: 'no': expected true or false"),
    ("resyncInterval: 0\n", 1, "resyncInterval: 0: must be between 0.1 and 3600 seconds"),
    ("resyncInterval: 3601\n", 1, "must be between 0.1 and 3600 seconds"),
    ("resyncInterval: '2'\n", 1, "resyncInterval: '2': expected a number of seconds, got string"),
    ("resyncInterval: .inf\n", 1, "resyncInterval: inf: must be between"),
    ("resyncInterval: 1:30\n", 1, "resyncInterval: '1:30' is the base-60 number 90 in YAML 1.1; write 90"),
    ("limits:\n  maxRules: 1:00:00\n", 2, "limits.maxRules: '1:00:00' is the base-60 number 3600"),
    ("limits:\n  maxRules: 0\n", 2, "limits.maxRules: 0: must be at least 1"),
    ("limits:\n  maxRules: 4294967296\n", 2, "must be at most 4294967295"),
    ("limits:\n  maxCgroups: 1.5\n", 2, "limits.maxCgroups: 1.5: expected an integer, got number"),
    ("limits:\n  maxCgroups: true\n", 2, "limits.maxCgroups: True: expected an integer, got boolean"),
    ("logLevel: warn\n", 1, "logLevel: 'warn': expected one of debug, info, warning, error"),
    ("logLevel: 2022-01-01\n", 1, "logLevel: datetime.date(2022, 1, 1): expected one of"),
])
def test_rejected_value(tmp_path, text, line, fragment):
    err = rejected(tmp_path, text)
    assert err.line == line
    assert str(err).startswith(f"{tmp_path / 'hostagent.yaml'}:{line}: ")
    assert fragment in str(err)


@pytest.mark.parametrize("text, line, fragment", [
    ("- a\n- b\n", 1, "expected a mapping of settings at the top level, got a list"),
    ("just a string\n", 1, "expected a mapping of settings at the top level"),
    ("logLevel: info\nlogLevel: debug\n", 2, "logLevel: duplicate key"),
    ("metadata:\n  nat64: true\n  nat64: false\n", 3, "metadata.nat64: duplicate key"),
    ("1: a\n", 1, "keys must be strings"),
    ("metadata:\n  true: 1\n", 2, "keys must be strings in metadata"),
    ("base: &b {allow: true}\nevents:\n  <<: *b\n", 3, "merge keys (<<) are not supported"),
    ("x: &a [1]\ny: *a\n", 2, "aliases of lists or mappings are not supported"),
    ("logLevel: !!python/name:os.system info\n", 1, "invalid YAML"),
    ("logLevel: !custom info\n", 1, "invalid YAML"),
])
def test_rejected_structure(tmp_path, text, line, fragment):
    err = rejected(tmp_path, text)
    assert err.line == line
    assert fragment in str(err)


def test_scalar_aliases_are_fine(tmp_path):
    config = load_text(tmp_path, "bpffsDir: &d /run/x\nstateDir: *d\n")
    assert (config.bpffs_dir, config.state_dir) == ("/run/x", "/run/x")


@pytest.mark.parametrize("text, line", [
    ("logLevel: info\nmetadata:\n  nat64: [true\n", 4),   # unclosed flow sequence: found at end
    ("logLevel: info\n  bad: indent\n", 2),
    ("eventLog: -\n", 1),
    ("a: 'unterminated\n", 2),
    ("logLevel: info\n\tdefaultAction: deny\n", 2),
    ("a: 1\n---\nb: 2\n", 2),                            # more than one document
])
def test_yaml_syntax_error(tmp_path, text, line):
    err = rejected(tmp_path, text)
    assert err.line == line
    assert str(err).startswith(f"{tmp_path / 'hostagent.yaml'}:{line}: invalid YAML: ")


def test_control_character_is_a_config_error(tmp_path):
    err = rejected(tmp_path, "logLevel: info\nstateDir: /a\x07b\n")
    assert err.line == 2
    assert "invalid YAML" in str(err)


def test_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: config file not found"


def test_directory_is_not_a_config_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path)


def test_not_utf8(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"policyDir: /etc/caf\xe9\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(path)


def test_config_error_is_a_hostagent_error(tmp_path):
    with pytest.raises(HostAgentError):
        load_config(tmp_path / "nope.yaml")


def test_bad_exempt_pattern_from_normalizer(tmp_path, monkeypatch):
    def refuse(s):
        raise ValueError(repr(s))

    stub = types.ModuleType(SELECTOR)
    stub.normalize_cgroup_pattern = refuse
    monkeypatch.setitem(sys.modules, SELECTOR, stub)
    err = rejected(tmp_path, "metadata:\n  exempt:\n    - cgroupPath: '/a/***'\n")
    assert err.line == 3
    assert str(err).endswith("metadata.exempt[0].cgroupPath: '/a/***': not a valid cgroup path pattern")


# ---------------------------------------------------------------------------------------------
# overrides


def test_overrides_win_over_file(tmp_path):
    path = write(tmp_path, "policyDir: /from/file\nlogLevel: debug\nmetrics: {listen: '127.0.0.1:1'}\n")
    config = load_config(path, {"policyDir": "/from/flag", "metrics.listen": "127.0.0.1:0", "eventLog": "-"})
    assert config.policy_dir == "/from/flag"
    assert config.metrics_listen == ("127.0.0.1", 0)
    assert config.event_log == "-"
    assert config.log_level == "debug"  # not overridden: the file's value stays
    assert config.source == str(path)


@pytest.mark.parametrize("overrides, changes", [
    ({"cgroupRoot": "/sys/fs/cgroup/x"}, {"cgroup_root": "/sys/fs/cgroup/x"}),
    ({"defaultAction": "deny"}, {"default_action": DefaultAction.DENY}),
    ({"metrics.listen": ""}, {"metrics_listen": None}),
    ({"eventLog": ""}, {"event_log": None}),
    ({"events.allow": True}, {"emit_allow_events": True}),
    ({"resyncInterval": 0.5}, {"resync_interval": 0.5}),
    ({"limits.maxRules": 10, "limits.maxCgroups": 20}, {"max_rules": 10, "max_cgroups": 20}),
    ({"logLevel": "error"}, {"log_level": "error"}),
    ({"logLevel": None, "eventLog": None}, {}),  # None = flag not given
])
def test_overrides_on_defaults(overrides, changes):
    assert load_config(None, overrides) == dataclasses.replace(default_config(), **changes)


def test_metadata_overrides():
    config = load_config(None, {
        "metadata.endpoints": ("10.0.0.1", "fd00::1"),
        "metadata.exempt": [{"cgroupPath": "/a"}],
        "metadata.nat64": False,
    })
    assert config.metadata == MetadataConfig(_networks("10.0.0.1/32", "fd00::1/128"), ("/a",), False)


@pytest.mark.parametrize("overrides, flags, message", [
    ({"metrics.listen": "nope"}, {"metrics.listen": "--metrics-listen"},
     "--metrics-listen: 'nope': missing :PORT"),
    ({"metrics.listen": "nope"}, {}, "command-line override metrics.listen: 'nope': missing :PORT"),
    ({"resyncInterval": "2"}, {"resyncInterval": "--resync-interval"},
     "--resync-interval: '2': expected a number of seconds, got string"),
    ({"metadata.endpoints": ["10.0.0.0/8", "1.2.3.4/8"]}, {"metadata.endpoints": "--metadata-endpoint"},
     "--metadata-endpoint[1]: '1.2.3.4/8': host bits set"),
    ({"metadata.exempt": [{"cgroupPath": "/a", "x": 1}]}, {},
     "command-line override metadata.exempt[0].x: unknown key; allowed keys in metadata.exempt[0]: cgroupPath"),
    ({"policydir": "/x"}, {}, "command-line override policydir: unknown setting; allowed: cgroupRoot,"),
    ({"metadata": {"nat64": False}}, {}, "command-line override metadata: unknown setting"),
])
def test_rejected_overrides(overrides, flags, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides, flag_names=flags)
    assert str(info.value).startswith(message)
    assert info.value.where() == ""  # not about a place in a file


def test_broken_file_is_reported_even_if_overridden(tmp_path):
    # The file is checked first: a broken file is reported even if a flag would replace the key.
    path = write(tmp_path, "policyDir: relative\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, {"policyDir": "/ok"})
    assert info.value.line == 1


def test_schema_and_attribute_table_agree():
    from hostagent import config as module

    schema = module._schema()

    def leaves(section, prefix=""):
        for key, sub in section.fields.items():
            if isinstance(sub, module._Section) and sub.build is None:
                yield from leaves(sub, prefix + key + ".")
            else:
                yield prefix + key

    assert sorted(leaves(schema)) == sorted(module._ATTRS)
    fields = {f.name for f in dataclasses.fields(NodeConfig)} - {"metadata", "dns", "source"}
    fields |= {"metadata." + f.name for f in dataclasses.fields(MetadataConfig)}
    fields |= {"dns." + f.name for f in dataclasses.fields(module.DnsConfig)}
    assert sorted(module._ATTRS.values()) == sorted(fields)


def test_config_is_immutable():
    config = default_config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.policy_dir = "/x"  # type: ignore[misc]
    assert hash(config) == hash(default_config())


def test_packaged_file_sets_every_leaf_of_the_schema():
    from hostagent import config as module

    text = PACKAGED.read_text()
    for dotted in module._ATTRS:
        leaf = dotted.rsplit(".", 1)[-1]
        assert re.search(rf"(^\s*|[{{,]\s*){leaf}:", text, re.M), dotted


@pytest.mark.parametrize("name, ok", [("Dns.Google.", "dns.google"), ("a..b", None),
                                      ("*.google", None), ("10.0.0.1", None)])
def test_encrypted_dns_names_are_normalised_like_policy_fqdns(tmp_path, name, ok):
    path = tmp_path / "c.yaml"
    path.write_text(f"dns:\n  encryptedDns:\n    names: [{name!r}]\n")
    if ok is None:
        with pytest.raises(ConfigError, match="dns.encryptedDns.names"):
            load_config(path)
    else:
        assert load_config(path).dns.encrypted_dns_names == (ok,)
