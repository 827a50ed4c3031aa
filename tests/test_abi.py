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
              "MAX_ENCRYPTED_DNS_PORTS", "FQDN_NAMED", "RULE_NONE")
    for name in shared:
        assert defines[name] == getattr(abi, name), name


def test_user_space_key_layouts_match_the_header():
    from hostagent import fqdn

    assert fqdn._FQDN_KEY.size == ct.sizeof(abi.FqdnKey)
    assert fqdn._CLIENT_KEY.size == ct.sizeof(abi.DnsClientKey)


def test_the_resolver_attribution_key_is_address_key():
    import ipaddress

    from hostagent import fqdn

    for text in ("127.0.0.1", "10.1.2.3", "::1", "fd00::5", "::ffff:10.0.0.1"):
        assert fqdn.source_key(text) == abi.address_key(ipaddress.ip_address(text)), text
