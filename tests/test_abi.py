"""bpf/lib/abi.h and hostagent/bpf/abi.py must agree byte for byte (tetragon's alignchecker).

The header is compiled with the host C compiler (it uses only fixed-width uapi types, so the
layout is the one the BPF target sees) and every sizeof, offsetof and enum value is compared.
"""

from __future__ import annotations

import ctypes as ct
import re
import subprocess
from pathlib import Path

import pytest

from hostagent.bpf import abi
from hostagent.config import DefaultAction
from hostagent.policy.model import Protocol

HEADER = Path(__file__).resolve().parents[1] / "bpf" / "lib" / "abi.h"


def _c_layout(tmp_path: Path) -> dict[str, int]:
    lines = ['#include <stdio.h>', '#include <stddef.h>', '#include <linux/types.h>',
             f'#include "{HEADER}"', "int main(void) {"]
    for cname, mirror in abi.STRUCTS.items():
        lines.append(f'printf("{cname} %zu\\n", sizeof(struct {cname}));')
        for field, *_ in mirror._fields_:
            lines.append(f'printf("{cname}.{field} %zu\\n", offsetof(struct {cname}, {field}));')
    lines.append("return 0; }")
    src = tmp_path / "layout.c"
    src.write_text("\n".join(lines))
    exe = tmp_path / "layout"
    subprocess.run(["cc", "-o", str(exe), str(src)], check=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    return {k: int(v) for k, v in (line.split() for line in out.splitlines())}


def test_struct_sizes_and_offsets_match(tmp_path):
    c = _c_layout(tmp_path)
    for cname, mirror in abi.STRUCTS.items():
        assert ct.sizeof(mirror) == c[cname], cname
        for field, *_ in mirror._fields_:
            assert getattr(mirror, field).offset == c[f"{cname}.{field}"], f"{cname}.{field}"


def _c_enum(name: str) -> dict[str, int]:
    text = HEADER.read_text()
    body = re.search(r"enum " + name + r"\s*\{(.*?)\};", text, re.S)
    assert body, name
    return {m.group(1): int(m.group(2))
            for m in re.finditer(r"^\s*([A-Z0-9_]+)\s*=\s*(\d+)", body.group(1), re.M)}


@pytest.mark.parametrize("cname", sorted(abi.ENUMS))
def test_enums_share_numbers(cname):
    enum_cls, prefix = abi.ENUMS[cname]
    c = _c_enum(cname)
    py = {prefix + m.name: m.value for m in enum_cls}
    assert py == c


def test_default_action_and_protocol_bits_match_the_header():
    c = _c_enum("hostagent_default_action")
    for member in DefaultAction:
        assert c[f"DEFAULT_ACTION_{member.name}"] == member.value
    text = HEADER.read_text()
    assert f"#define PROTO_BIT_TCP {int(Protocol.TCP)}" in text
    assert f"#define PROTO_BIT_UDP {int(Protocol.UDP)}" in text
    for name in ("MAX_CGROUP_DEPTH", "MAX_PORT_RANGES", "HOSTAGENT_ABI_VERSION"):
        value = re.search(rf"#define {name} (\d+)", text).group(1)
        assert int(value) == {"HOSTAGENT_ABI_VERSION": abi.ABI_VERSION}.get(
            name, getattr(abi, name, None)), name


def test_every_flag_and_size_of_the_header_has_its_python_twin():
    text = HEADER.read_text()
    defines = {m.group(1): int(m.group(2), 0)
               for m in re.finditer(r"^#define (\w+) (0x[0-9a-fA-F]+|\d+)\b", text, re.M)}
    shared = ("CONFIG_EMIT_ALLOW", "BINDING_METADATA_EXEMPT", "BINDING_ALLOW_RAW",
              "BINDING_PENDING", "BINDING_CONFLICT", "BINDING_FQDN", "RULE_NAMED",
              "PROTECTED_METADATA", "PROTECTED_ENCRYPTED_DNS", "DNS_REDIRECT",
              "MAX_ENCRYPTED_DNS_PORTS", "FQDN_NAMED", "RULE_NONE", "PROTECTED_FILTER_BITS",
              "PROTECTED_FILTER_WORDS", "ALLOW_COUNT_POLICIES", "ALLOW_COUNT_STRIDE",
              "ALLOW_COUNT_SLOTS", "ALLOW_COUNT_NODE_DEFAULT")
    for name in shared:
        assert defines[name] == getattr(abi, name), name


def test_user_space_key_layouts_match_the_header():
    from hostagent import fqdn

    assert fqdn._FQDN_KEY.size == ct.sizeof(abi.FqdnKey)
    assert fqdn._CLIENT_KEY.size == ct.sizeof(abi.DnsClientKey)
    assert fqdn._CLIENT_VALUE.size == ct.sizeof(abi.DnsClient)


def test_the_resolver_attribution_key_is_address_key():
    import ipaddress

    from hostagent import fqdn

    for text in ("127.0.0.1", "10.1.2.3", "::1", "fd00::5", "::ffff:10.0.0.1"):
        assert fqdn.source_key(text) == abi.address_key(ipaddress.ip_address(text)), text


def _key_prefix(text: str) -> tuple[int, int]:
    import ipaddress

    net = abi.as_v6_network(ipaddress.ip_network(text))
    return int(net.network_address), net.prefixlen


def _inside(prefix: tuple[int, int], rng) -> list[bytes]:
    """The first, the last and a few random addresses of a key prefix, as 16-byte keys."""
    addr, plen = prefix
    span = 1 << (128 - plen)
    picks = [0, span - 1] + [rng.randrange(span) for _ in range(6)]
    return [(addr + p).to_bytes(16, "big") for p in picks]


PROTECTED_CASES = [
    "169.254.169.254/32", "100.100.100.200/32", "fd00:ec2::254/128", "64:ff9b::a9fe:a9fe/128",
    "100.64.0.0/10", "10.0.0.0/8", "0.0.0.0/0", "169.254.0.0/16", "169.254.0.0/17",
    "fd00:ec0::/28", "fd00::/8", "2001:db8::/32", "2001:db8::/31", "64:ff9b::/96",
    "64:ff9b::a00:0/104", "::/0", "::/80", "::ffff:0:0/96", "::ffff:a9fe:0/112", "::/96",
]


@pytest.mark.parametrize("text", PROTECTED_CASES)
def test_protected_filter_covers_every_address_of_a_prefix(text):
    """The kernel skips the metadata trie where the filter says no: that must never be for an
    address some protected prefix covers, whatever its length (shorter than the filter's /16 or
    32-bit granularity included), in the IPv4-mapped space or not."""
    import random

    rng = random.Random(text)
    prefix = _key_prefix(text)
    f = abi.protected_filter([prefix, _key_prefix("fd20:ce::254/128")])
    for key in _inside(prefix, rng):
        assert abi.maybe_protected(f, key), (text, key.hex())


def test_protected_filter_lets_other_destinations_skip_the_trie():
    import ipaddress

    f = abi.protected_filter([_key_prefix(c) for c in
                              ("169.254.169.254/32", "fd00:ec2::254/128", "100.64.0.0/10",
                               "64:ff9b::a9fe:a9fe/128", "fd00:ec0::/28")])
    assert f.ready == 1
    for text in ("127.0.0.1", "10.1.2.3", "100.128.0.1", "169.255.0.1", "fd00:10::1",
                 "2001:db8::1", "::1", "64:ff9c::1"):
        assert not abi.maybe_protected(f, abi.address_key(ipaddress.ip_address(text))), text
    for text in ("169.254.1.1", "100.127.255.255", "fd00:ecf::1", "64:ff9b::1"):
        assert abi.maybe_protected(f, abi.address_key(ipaddress.ip_address(text))), text
    assert abi.maybe_protected(abi.protected_filter([], ready=False),
                               abi.address_key(ipaddress.ip_address("127.0.0.1")))


def test_allow_count_slots_decode_to_decision_keys():
    for policy_id in (0, 1, 7, abi.ALLOW_COUNT_POLICIES - 1):
        for hook in abi.Hook:
            for reason, offset in ((abi.Reason.POLICY_RULE, 0),
                                   (abi.Reason.NODE_DEFAULT, abi.ALLOW_COUNT_NODE_DEFAULT)):
                slot = policy_id * abi.ALLOW_COUNT_STRIDE + offset + hook
                assert slot < abi.ALLOW_COUNT_SLOTS
                assert abi.allow_count_key(slot) == (policy_id, abi.Verdict.ALLOW, reason, hook)
    assert max(abi.Hook) < abi.ALLOW_COUNT_NODE_DEFAULT
