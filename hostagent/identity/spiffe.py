"""SPIFFE IDs for the workloads the agent sees.

Pods get the Kubernetes convention that Istio and SPIRE's k8s workload attestor use,
``spiffe://<trust domain>/ns/<namespace>/sa/<service account>``: a pod's identity is its service
account, so every replica of a deployment shares one ID. Systemd units and containers that no
Kubernetes pod owns get an ID from a configurable template (defaults below). Plain cgroups get
none: nothing names them, so there is nothing to say.

Templates are ``spiffe://{trustDomain}/`` followed by path segments, each literal text with at
most one placeholder (two values in one segment could be told apart only by guessing where one
ends). Which placeholders a template may use depends on what it identifies:

==============  ========================================================  =====  =========
placeholder     value                                                     unit   container
==============  ========================================================  =====  =========
{trustDomain}   the configured trust domain                               yes    yes
{node}          this node's name                                          yes    yes
{unit}          the systemd unit, as systemd spells it                    yes    no
{slice}         the innermost systemd slice containing the unit           yes    no
{containerId}   the container's 64-hex id                                 no     yes
{runtime}       "containerd", "cri-o", "docker" or "podman"               no     yes
{cgroupPath}    the cgroup path of the workload, one segment per level    yes    yes
==============  ========================================================  =====  =========

Encoding. SPIFFE path segments are ``[A-Za-z0-9._-]``. A placeholder's value is put in as it is
when it only has those characters, which covers pod namespaces and service accounts (DNS labels),
node names, container ids, runtimes and most unit names. Any other byte of the value's UTF-8 is
percent-encoded as ``%XX`` with upper-case hex (RFC 3986 section 2.1), ``%`` itself included, so
the encoding is injective: two different values never give the same segment, and decoding gives
back the value exactly. Systemd unit names are encoded *as systemd spells them*, without undoing
systemd's own escaping first: ``getty@tty1.service`` becomes ``getty%40tty1.service`` and
``systemd-fsck@dev-disk-by\\x2duuid-1a2b.service`` becomes
``systemd-fsck%40dev-disk-by%5Cx2duuid-1a2b.service``. Unescaping ``\\x2d`` to ``-`` would map
the two distinct units ``a\\x2db.service`` and ``a-b.service`` to one ID; kept literal, the ID
decodes to the name ``systemctl`` knows. A value that is exactly ``.`` or ``..`` is written
``%2E``/``%2E%2E`` (a dot segment would be resolved away by URI parsers).

Interoperability caveat: the current SPIFFE ID specification and the strict parsers that follow
it (go-spiffe's ``spiffeid.FromString``, java-spiffe, rust-spiffe) accept only ``[A-Za-z0-9._-]``
in the path and reject ``%``. IDs that needed encoding are therefore fine for tagging events and
matching policies here, but would be refused if handed to SPIRE or go-spiffe as SVID IDs. Only
values with other characters are affected; a template that must always yield strictly
conformant IDs should avoid placeholders whose values may carry them (``{unit}`` for template
units, ``{cgroupPath}``).

A placeholder whose value is unknown (None or empty) makes :func:`render` return None rather than
an ID with a hole in it; so does a result longer than the 2048 bytes the specification lets
implementations refuse.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping

__all__ = [
    "CONTAINER_PLACEHOLDERS",
    "DEFAULT_CONTAINER_TEMPLATE",
    "DEFAULT_UNIT_TEMPLATE",
    "MAX_ID_BYTES",
    "POD_TEMPLATE",
    "UNIT_PLACEHOLDERS",
    "encode_segment",
    "pod_id",
    "render",
    "validate_template",
    "validate_trust_domain",
]

DEFAULT_UNIT_TEMPLATE = "spiffe://{trustDomain}/node/{node}/unit/{unit}"
DEFAULT_CONTAINER_TEMPLATE = "spiffe://{trustDomain}/node/{node}/container/{containerId}"
# The Kubernetes convention (Istio, SPIRE). Not configurable: other systems match on it.
POD_TEMPLATE = "spiffe://{trustDomain}/ns/{namespace}/sa/{serviceAccount}"

# SPIFFE-ID.md 2.3: implementations need not accept longer IDs, so none are generated.
MAX_ID_BYTES = 2048
# SPIFFE-ID.md 2.1 via RFC 3986's host: at most 255 bytes.
_MAX_TRUST_DOMAIN = 255

UNIT_PLACEHOLDERS = frozenset({"trustDomain", "node", "unit", "slice", "cgroupPath"})
CONTAINER_PLACEHOLDERS = frozenset({"trustDomain", "node", "containerId", "runtime",
                                    "cgroupPath"})
_TEMPLATE_PLACEHOLDERS = {"unit": UNIT_PLACEHOLDERS, "container": CONTAINER_PLACEHOLDERS}
_KNOWN = UNIT_PLACEHOLDERS | CONTAINER_PLACEHOLDERS
# A template must tell workloads apart: one of these must appear, or every unit (container) of
# the node would share a single ID.
_DISTINGUISHING = {"unit": ("unit", "cgroupPath"), "container": ("containerId", "cgroupPath")}
# Expands to several segments (one per cgroup level), so it must be whole segments on its own.
_MULTI_SEGMENT = "cgroupPath"

_PREFIX = "spiffe://{trustDomain}/"

_A = re.ASCII
_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]+", _A)
_SEGMENT_CHARS = re.compile(r"[A-Za-z0-9._-]*", _A)
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
_SAFE_BYTES = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")


def _fail(value: object, reason: str) -> ValueError:
    return ValueError(f"{value!r}: {reason}")


def validate_trust_domain(td: str) -> str:
    """``td`` if it is a SPIFFE trust domain name, else ValueError saying what is wrong.

    SPIFFE-ID.md 2.1: lower-case letters, digits, ``.``, ``-`` and ``_``; no scheme, port or
    user info; at most 255 bytes.
    """
    if not isinstance(td, str):
        raise _fail(td, "a trust domain must be a string")
    if not td:
        raise _fail(td, "the trust domain is empty")
    if td.startswith("spiffe://"):
        raise _fail(td, "give the trust domain without the spiffe:// scheme "
                        f"(for example {td[len('spiffe://'):].rstrip('/')!r})")
    if len(td) > _MAX_TRUST_DOMAIN:
        raise _fail(td, f"a trust domain is at most {_MAX_TRUST_DOMAIN} characters")
    if not _TRUST_DOMAIN.fullmatch(td):
        if _TRUST_DOMAIN.fullmatch(td.lower()):
            raise _fail(td, f"a SPIFFE trust domain must be lower case ({td.lower()!r})")
        bad = sorted({c for c in td if not _TRUST_DOMAIN.fullmatch(c)})
        raise _fail(td, "a SPIFFE trust domain may contain only lower-case letters, digits, "
                        f"'.', '-' and '_' (found {''.join(bad)!r})")
    return td


def encode_segment(value: str) -> str:
    """``value`` as one SPIFFE path segment: see the module docstring for the encoding."""
    if _SEGMENT_CHARS.fullmatch(value):
        if value == "." or value == "..":
            return "%2E" * len(value)
        return value
    return "".join(chr(b) if b in _SAFE_BYTES else f"%{b:02X}" for b in value.encode("utf-8"))


# A compiled template: the path after "spiffe://{trustDomain}/" as segments, each a tuple of
# parts; a part is (False, literal) or (True, placeholder name).
_Part = tuple[bool, str]
_Compiled = tuple[tuple[_Part, ...], ...]


def _compile(template: str) -> _Compiled:
    """Parse and check the structure of a template; ValueError naming what is wrong."""
    if not isinstance(template, str):
        raise _fail(template, "a SPIFFE ID template must be a string")
    return _compile_str(template)


@functools.lru_cache(maxsize=64)
def _compile_str(template: str) -> _Compiled:
    if not template.startswith(_PREFIX):
        raise _fail(template, "a SPIFFE ID template must start with 'spiffe://{trustDomain}/' "
                              "(the trust domain is configured once, on its own)")
    path = template[len(_PREFIX):]
    if not path:
        raise _fail(template, "the template has no path: the ID would name the trust domain, "
                              "not a workload")
    segments: list[tuple[_Part, ...]] = []
    for raw in path.split("/"):
        if not raw:
            raise _fail(template, "empty path segment ('//' or a trailing '/')")
        parts: list[_Part] = []
        pos = 0
        for m in _PLACEHOLDER.finditer(raw):
            if m.start() > pos:
                parts.append((False, raw[pos:m.start()]))
            parts.append((True, m[1]))
            pos = m.end()
        if pos < len(raw):
            parts.append((False, raw[pos:]))
        for is_name, text in parts:
            if is_name:
                continue
            if "{" in text or "}" in text:
                raise _fail(template, f"unbalanced brace in segment {raw!r}")
            if not _SEGMENT_CHARS.fullmatch(text):
                bad = sorted({c for c in text if not _SEGMENT_CHARS.fullmatch(c)})
                raise _fail(template, f"segment {raw!r} has characters a SPIFFE path may not "
                                      f"contain: {''.join(bad)!r} (only letters, digits, '.', "
                                      "'-' and '_'; placeholder values are encoded for you)")
        if raw in (".", ".."):
            raise _fail(template, f"dot segment {raw!r}")
        names = [text for is_name, text in parts if is_name]
        if len(names) > 1:
            # "{node}_{unit}" could be read back two ways when a value holds "_": with one
            # value per segment, fixed literal text and an injective encoding, distinct
            # workloads always get distinct IDs
            raise _fail(template, f"segment {raw!r} has more than one placeholder; use one per "
                                  "path segment, so that an ID can be read back one way only")
        if _MULTI_SEGMENT in names and len(parts) != 1:
            raise _fail(template, f"{{{_MULTI_SEGMENT}}} expands to several segments and must "
                                  f"be a whole segment on its own, not part of {raw!r}")
        segments.append(tuple(parts))
    return tuple(segments)


def validate_template(template: str, kind: str) -> str:
    """``template`` if it is a valid SPIFFE ID template for ``kind`` ("unit" or "container").

    ValueError naming the problem: not ``spiffe://{trustDomain}/...``, a malformed segment, an
    unknown placeholder, a placeholder that ``kind`` does not provide (``{unit}`` in a container
    template), or no placeholder that tells one workload from another.
    """
    allowed = _TEMPLATE_PLACEHOLDERS.get(kind) if isinstance(kind, str) else None
    if allowed is None:
        raise _fail(kind, "template kind must be 'unit' or 'container'")
    segments = _compile(template)
    used = {text for seg in segments for is_name, text in seg if is_name}
    for name in sorted(used):
        if name not in _KNOWN:
            hint = next((k for k in sorted(_KNOWN) if k.lower() == name.lower()), None)
            did_you_mean = f"; did you mean {{{hint}}}?" if hint else ""
            raise _fail(template, f"unknown placeholder {{{name}}} (known: "
                                  f"{_names(_KNOWN)}){did_you_mean}")
        if name not in allowed:
            raise _fail(template, f"placeholder {{{name}}} is not available in a {kind} "
                                  f"template (available: {_names(allowed)})")
    if not used.intersection(_DISTINGUISHING[kind]):
        need = " or ".join(f"{{{n}}}" for n in _DISTINGUISHING[kind])
        raise _fail(template, f"a {kind} template must use {need}: otherwise every {kind} of "
                              "the node would get the same SPIFFE ID")
    if render(template, **_SAMPLE) is None:
        raise _fail(template, f"the IDs would be longer than {MAX_ID_BYTES} bytes")
    return template


# Short values for every placeholder, to render a template once when it is validated.
_SAMPLE = {"trustDomain": "example.org", "node": "node", "unit": "x.service",
           "slice": "system.slice", "containerId": "0" * 64, "runtime": "containerd",
           "cgroupPath": "/system.slice/x.service"}


def _names(names: frozenset[str]) -> str:
    return ", ".join(f"{{{n}}}" for n in sorted(names))


def render(template: str, **values: str | None) -> str | None:
    """The SPIFFE ID ``template`` gives for ``values`` (placeholder name -> value).

    Values are encoded as the module docstring says; ``cgroupPath`` is split on ``/`` and each
    component is encoded as its own segment. Returns None when a value the template uses is
    None or empty (or, for cgroupPath, has no components), or when the ID would be longer than
    MAX_ID_BYTES. ValueError for a malformed template, an invalid trustDomain, or a placeholder
    missing from ``values`` (a caller bug, not an unknown value).
    """
    segments = _compile(template)
    td = values.get("trustDomain")
    if td is None:
        raise _fail(template, "no value for {trustDomain}")
    out = ["spiffe://", validate_trust_domain(td)]
    for seg in segments:
        out.append("/")
        if len(seg) == 1 and seg[0] == (True, _MULTI_SEGMENT):
            parts = _multi(template, values)
            if parts is None:
                return None
            out.append(parts)
            continue
        text = []
        for is_name, part in seg:
            if not is_name:
                text.append(part)
                continue
            value = _value(template, values, part)
            if value is None:
                return None
            text.append(value)
        out.append("".join(text))
    result = "".join(out)
    return result if len(result) <= MAX_ID_BYTES else None  # ASCII: len is bytes


def _value(template: str, values: Mapping[str, str | None], name: str) -> str | None:
    if name not in values:
        raise _fail(template, f"no value for {{{name}}}")
    value = values[name]
    if value is None or value == "":
        return None
    return encode_segment(value)


def _multi(template: str, values: Mapping[str, str | None]) -> str | None:
    if _MULTI_SEGMENT not in values:
        raise _fail(template, f"no value for {{{_MULTI_SEGMENT}}}")
    value = values[_MULTI_SEGMENT]
    if not value:
        return None
    parts = [p for p in value.split("/") if p]
    if not parts:
        return None
    return "/".join(encode_segment(p) for p in parts)


def pod_id(trust_domain: str, namespace: str, service_account: str) -> str | None:
    """``spiffe://<td>/ns/<namespace>/sa/<service account>``; None if either name is empty."""
    return render(POD_TEMPLATE, trustDomain=trust_domain, namespace=namespace,
                  serviceAccount=service_account)
