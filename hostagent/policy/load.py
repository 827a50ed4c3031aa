"""Load and validate EgressPolicy YAML into the immutable model (hostagent.policy.model).

Why it looks the way it does:

* YAML is *composed*, never constructed: the node tree keeps the line of every value, so each
  error can say ``file:line: where.in.the.document: what is wrong (what is expected)``, and no
  YAML tag can ever create a Python object. Scalars are converted here, strictly: a port must be
  an integer, not the string "443"; a boolean is ``true`` or ``false``, not ``yes``.
* Every problem in a directory is collected before anything is raised (as one PolicyErrors), so
  ``policy check`` can show them all at once, and an invalid update is rejected as a whole.
* Anchors/aliases and deep nesting are refused, and files are size-limited, so a broken or
  hostile file cannot make loading slow or exhaust memory (alias bombs).
* Peer kinds and selector kinds are parsed through ``{key: parser}`` tables (_PEERS,
  _SELECTORS): a new kind is one parser and one entry.
* ``fqdn`` and ``fqdnPattern`` peers are validated by hostagent.dns.names, the module that also
  matches query names at runtime, so what loads is exactly what can match. How broad a pattern
  may be is node policy (``dns.fqdnPatternMinLabels``), so the limit is a loader argument.
* Selectors in YAML that are identities rather than paths (``kubernetes``, ``container``,
  ``systemdUnit``) are checked as the system that owns the name would check it (the API server,
  systemd), so a selector that could never match anything is an error here, not a silent no-op.
  Kubernetes label selectors are validated by hostagent.identity.labels on plain values that
  this module builds from well-typed nodes, keeping each node's line for the error.
* Large policies (100k CIDRs) are the agent's reload path, so three things keep them cheap
  without a second, laxer parser: the cyclic garbage collector is paused while a load builds
  its million objects (it rescanned them over and over: 4x the parse itself); long
  runs of ``- cidr: ADDRESS/LEN`` lines are read by a regular expression, after libyaml has
  confirmed that they are list items (_compose_bulk); and PolicyDirLoader parses again only the
  files whose bytes changed, and reuses the peers of lines it has already converted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import gc
import ipaddress
import itertools
import os
import re
import socket
import stat
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping

import yaml
from yaml.composer import ComposerError
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from hostagent import converters
from hostagent.dns.names import normalize_name, normalize_pattern
from hostagent.errors import PolicyError
from hostagent.identity.labels import LabelSelector, parse_label_selector
from hostagent.policy.model import (
    CIDRPeer,
    ContainerSelector,
    EgressRule,
    FQDNPatternPeer,
    FQDNPeer,
    KubernetesSelector,
    Mode,
    Peer,
    Policy,
    PortRange,
    Protocol,
    Selector,
    SelectorKind,
)
from hostagent.policy.selector import (
    name_glob_overlap_example,
    name_glob_specificity,
    normalize_cgroup_pattern,
    normalize_name_glob,
    overlap_example,
    specificity,
)

__all__ = [
    "API_VERSION",
    "KIND",
    "MAX_FILE_BYTES",
    "POLICY_SUFFIXES",
    "PolicyDirLoader",
    "PolicyErrors",
    "gc_paused",
    "load_policy_dir",
    "load_policy_file",
    "load_policy_text",
    "cidr",
]

API_VERSION = "hostagent.io/v1"
KIND = "EgressPolicy"
POLICY_SUFFIXES = (".yaml", ".yml")
# Real policy files are a few KiB; the limit only stops a mistaken or hostile file early.
MAX_FILE_BYTES = 16 * 1024 * 1024
# A policy document nests 6 levels (spec.egress[].ports[].port); anything much deeper is not a
# policy, and unbounded depth would hit Python's recursion limit in the composer.
MAX_DEPTH = 32
# The node config's default for dns.fqdnPatternMinLabels: "*.example.com" is fine, "*.com" is not.
DEFAULT_FQDN_MIN_LABELS = 2

_NAME_RE = re.compile(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?")
_NAME_MAX = 253
_TICKET_MAX = 256
_DECIMAL_RE = re.compile(r"[-+]?(0|[1-9][0-9]*)")

# Kubernetes object names (apimachinery IsDNS1123Label / IsDNS1123Subdomain): namespaces and
# container names are labels, service accounts are subdomains.
_DNS_LABEL = r"[a-z0-9](?:[-a-z0-9]*[a-z0-9])?"
_DNS_LABEL_RE = re.compile(_DNS_LABEL, re.ASCII)
_DNS_LABEL_MAX = 63
_DNS_SUBDOMAIN_RE = re.compile(rf"{_DNS_LABEL}(?:\.{_DNS_LABEL})*", re.ASCII)
_DNS_SUBDOMAIN_MAX = 253

# systemd unit names (systemd.unit(5)): ASCII letters, digits, ":", "-", "_", "." and the
# backslash of escapes such as \x2d, one "@" before a template instance, at most 255 characters.
# Services, scopes and slices are the units whose cgroup holds a workload; other unit types have
# a cgroup at most while a helper of theirs runs (a socket's ExecStartPre, a mount helper).
_UNIT_GLOB_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789:_.\\@-*?")
_UNIT_SUFFIXES = (".service", ".scope", ".slice")
_UNIT_OTHER_TYPES = ("target", "socket", "timer", "path", "mount", "automount", "swap", "device")
_UNIT_MAX = 255

# Container ids are 64 lower-case hex digits in every runtime; a prefix of at least 12 is what
# `docker ps` and `crictl ps` print, and is long enough not to match a second container by chance.
_CONTAINER_ID_RE = re.compile(r"[0-9a-f]+", re.ASCII)
_CONTAINER_ID_LEN = 64
_CONTAINER_ID_MIN = 12

_TAG = "tag:yaml.org,2002:"
_STR, _INT, _BOOL, _NULL, _MAP, _SEQ = (_TAG + t for t in ("str", "int", "bool", "null", "map", "seq"))

# Tags YAML gives unquoted values by itself: where a string was meant, quoting it is the fix.
_IMPLICIT_TAGS = frozenset(_TAG + t for t in ("int", "bool", "null", "float", "timestamp", "merge", "value"))

_MODES = {m.value: m for m in Mode}
_PROTOCOLS = {"TCP": Protocol.TCP, "UDP": Protocol.UDP, "ANY": Protocol.ANY}


class PolicyErrors(PolicyError):
    """The policies are invalid."""

    def __init__(self, errors: Iterable[PolicyError]) -> None:
        self.errors: list[PolicyError] = list(errors)
        super().__init__("\n".join(str(e) for e in self.errors) or None)


# --- public API -----------------------------------------------------------------------------


def load_policy_text(
    text: str, path: str = "<string>", *, fqdn_min_labels: int = DEFAULT_FQDN_MIN_LABELS
) -> list[Policy]:
    """Parse and validate policies from ``text``; ``path`` is only used in error messages.

    ``fqdn_min_labels``: the fixed (non-``*``) labels an ``fqdnPattern`` needs at least, the
    node config's ``dns.fqdnPatternMinLabels``; a broader pattern is an error.
    """
    _check_min_labels(fqdn_min_labels)
    if len(text) > MAX_FILE_BYTES:
        raise PolicyErrors([_too_large(path)])
    with gc_paused():
        parsed, errors = _parse_text(text, path, fqdn_min_labels)
        return _finish(parsed, errors)


def load_policy_file(
    path: str | os.PathLike[str], *, fqdn_min_labels: int = DEFAULT_FQDN_MIN_LABELS
) -> list[Policy]:
    """Parse and validate one policy file; duplicate names and ambiguous selectors are checked
    among the policies of that file. ``fqdn_min_labels`` as for load_policy_text."""
    _check_min_labels(fqdn_min_labels)
    path = os.fspath(path)
    try:
        text = _decode(_read(path), path)
    except PolicyError as err:
        raise PolicyErrors([err]) from None
    with gc_paused():
        parsed, errors = _parse_text(text, path, fqdn_min_labels)
        return _finish(parsed, errors)


def load_policy_dir(
    path: str | os.PathLike[str], *, fqdn_min_labels: int = DEFAULT_FQDN_MIN_LABELS
) -> list[Policy]:
    """Parse and validate every *.yaml / *.yml file directly in ``path`` (dotfiles and other
    files are ignored, symlinks are followed as for Kubernetes ConfigMap mounts).

    Returns the policies sorted by name; an empty directory gives []. Raises PolicyErrors with
    every problem found, including names and selectors that clash across files.
    ``fqdn_min_labels`` as for load_policy_text.
    """
    return PolicyDirLoader(path, fqdn_min_labels=fqdn_min_labels).load()


@dataclasses.dataclass(frozen=True, slots=True)
class _FileResult:
    """What parsing one file's bytes gave: a pure function of (path, data, fqdn_min_labels)."""

    data: bytes
    parsed: tuple[_Parsed, ...]
    errors: tuple[PolicyError, ...]
    peers: Mapping[str, CIDRPeer]  # every cidr text of the file -> its peer, for the next parse


class PolicyDirLoader:
    """load_policy_dir for a directory that is loaded again and again (the agent's reloads).

    A file whose bytes are exactly those it had at the previous load() is not parsed again: its
    policies (the very same objects), and its errors if it had any, are taken from that load.
    Checks across files (names, overlapping selectors) run over every file each time, as in
    load_policy_dir. The comparison is of the whole content, not of size and mtime, so an edit
    that keeps both (two writes within the timestamp granularity) is still seen. A file that is
    parsed again reuses the CIDRPeer of every ``cidr`` text it already had, which makes a small
    edit of a large list cheap, and lets the caller compare old and new policies by identity.

    Not thread-safe: one loader per caller (the agent's main loop).
    """

    def __init__(
        self, path: str | os.PathLike[str], *, fqdn_min_labels: int = DEFAULT_FQDN_MIN_LABELS
    ) -> None:
        _check_min_labels(fqdn_min_labels)
        self.path = os.fspath(path)
        self.fqdn_min_labels = fqdn_min_labels
        self._results: dict[str, _FileResult] = {}   # by file path, as of the last load()
        self.parsed: list[str] = []       # the files the last load() parsed (not reused)
        self.files: list[tuple[str, bytes]] = []   # (path, content) of the files that gave
        # the policies of the last successful load(), sorted by path: what was in force
        self.read: dict[str, bytes] = {}   # every file the last load() read, loaded or not

    def load(self) -> list[Policy]:
        """The directory's policies sorted by name, or PolicyErrors (as load_policy_dir)."""
        directory = self.path
        try:
            with os.scandir(directory) as it:
                names = sorted(
                    e.name for e in it if not e.name.startswith(".") and e.name.endswith(POLICY_SUFFIXES)
                )
        except FileNotFoundError:
            raise PolicyErrors([PolicyError("policy directory does not exist", path=directory)]) from None
        except NotADirectoryError:
            raise PolicyErrors([PolicyError("policy directory is not a directory", path=directory)]) from None
        except OSError as exc:
            raise PolicyErrors(
                [PolicyError(f"cannot read policy directory: {exc.strerror}", path=directory)]
            ) from None
        parsed: list[_Parsed] = []
        errors: list[PolicyError] = []
        results: dict[str, _FileResult] = {}
        self.parsed = []
        self.read = {}
        with gc_paused():
            for name in names:
                file_path = os.path.join(directory, name)
                try:
                    data = self.read[file_path] = _read(file_path)
                    result = self._results.get(file_path)
                    if result is None or result.data != data:
                        self.parsed.append(file_path)
                        result = self._parse(file_path, data, result)
                except PolicyError as err:
                    errors.append(err)
                    continue
                results[file_path] = result
                parsed.extend(result.parsed)
                errors.extend(result.errors)
            self._results = results
            policies = _finish(parsed, errors)
        with_policies = {p.path for p in policies}
        self.files = [(path, results[path].data) for path in sorted(with_policies)]
        return policies

    def _parse(self, path: str, data: bytes, previous: _FileResult | None) -> _FileResult:
        text = _decode(data, path)   # PolicyError: not cached, the file is read again next time
        peers: dict[str, CIDRPeer] = {}
        file_parsed, file_errors = _parse_text(
            text, path, self.fqdn_min_labels, peers, previous.peers if previous else {})
        return _FileResult(data, tuple(file_parsed), tuple(file_errors), peers)


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector for a bulk build of short-lived, acyclic objects.

    Loading a 100k-entry list allocates about a million objects (YAML nodes, then the model);
    with the collector on, every 700 allocations start a collection, and the older generations'
    collections walk everything allocated so far, again and again as it grows: measured here,
    2.4 s to compose a 100k-rule file with libyaml instead of 0.6 s. Reference counting still
    frees everything that is not in a cycle (nodes and policy objects are not).

    On the way out, what the block built and kept is moved out of the young generations at once.
    Otherwise the young collections right after would walk those survivors twice more (0.1 s,
    then 0.12 s for 100k rules, in the middle of the reload). Where nothing is frozen, it goes
    to the oldest generation (gc.freeze() then gc.unfreeze(), as documented: "put them back
    into the oldest generation"), still collected at the next full collection. Where the agent
    froze its start-up heap (hostagent.daemon: full collections stall the resolver thread), it
    is frozen beside it: the policies are acyclic, so reference counting frees them when a
    later load replaces them. The price is that a cycle some other thread left as garbage in
    the young generations at that instant is never collected: a few objects per reload.
    Process-wide: other threads get no cyclic collection meanwhile, for the second or so a load
    takes. Nests; leaves the collector off if it was off.
    """
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        frozen = gc.get_freeze_count()
        gc.freeze()
        if not frozen:
            gc.unfreeze()
        gc.enable()


def _check_min_labels(value: int) -> None:
    # A caller's mistake, not a policy's: the node config bounds dns.fqdnPatternMinLabels already.
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"fqdn_min_labels must be an integer >= 1, got {value!r}")


def cidr(value: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """Converter for ``cidr:`` peers: the node config's strict CIDR converter, shared so that a
    policy and the node config can never disagree about what an address means."""
    return _cidr_peer_of(value).network


def _cidr_peer_of(text: str) -> CIDRPeer:
    """The peer of a cidr text, or ValueError: converters.cidr's reading of it, through
    _canonical_key where that applies (the network object is then built only if asked for)."""
    key = _canonical_key(text)
    return CIDRPeer.from_key(*key) if key is not None else CIDRPeer(network=converters.cidr(text))


_V4_TEXT = re.compile(r"([0-9.]{7,15})(?:/([0-9]{1,2}))?")
_V6_TEXT = re.compile(r"([0-9a-f:]{2,39})(?:/([0-9]{1,3}))?")


def _canonical_key(text: str) -> tuple[int, int, int] | None:
    """What converters.cidr(text) returns, as CIDRPeer.key (version, address, prefix length),
    for the two forms a long list is written in: a dotted quad and an IPv6 address in its
    canonical (RFC 5952) spelling, each with an optional /LEN and no host bits set; None for
    anything else, errors included, which converters.cidr then reads (and words). This skips
    ipaddress's string parser and its network object, most of the cost of a long list:
    inet_pton reads the address."""
    m = _V4_TEXT.fullmatch(text)
    if m is not None:
        family, version, bits = socket.AF_INET, 4, 32
    else:
        m = _V6_TEXT.fullmatch(text)
        if m is None:
            return None
        family, version, bits = socket.AF_INET6, 6, 128
    try:
        packed = socket.inet_pton(family, m[1])
    except OSError:
        return None
    # IPv6: only the canonical spelling, which ipaddress certainly reads as the same address
    if version == 6 and socket.inet_ntop(family, packed) != m[1]:
        return None
    length = bits
    if m[2] is not None:
        length = int(m[2])
        if length > bits:
            return None
    value = int.from_bytes(packed, "big")
    if value & ((1 << (bits - length)) - 1):
        return None   # host bits set: converters.cidr says so, with the network meant
    return version, value, length


# --- files and YAML -------------------------------------------------------------------------


def _too_large(path: str) -> PolicyError:
    mib, rest = divmod(MAX_FILE_BYTES, 1024 * 1024)
    limit = f"{mib} MiB" if mib and not rest else f"{MAX_FILE_BYTES} bytes"
    return PolicyError(f"file is larger than {limit}", path=path)


def _read(path: str) -> bytes:
    """The file's content, or PolicyError. Only regular files: a FIFO would block forever."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise PolicyError("not a regular file", path=path)
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise PolicyError(f"cannot read policy file: {exc.strerror}", path=path) from None
    if len(data) > MAX_FILE_BYTES:
        raise _too_large(path)
    return data


def _decode(data: bytes, path: str) -> str:
    """The text of a file's content, or PolicyError."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise PolicyError(f"invalid UTF-8 at byte {exc.start}", path=path, line=line) from None


class _Loader(yaml.SafeLoader):
    """SafeLoader that refuses anchors, aliases and deep nesting (see module docstring)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Node | None, index: object) -> Node:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or event.anchor is not None:
            raise ComposerError(
                None,
                None,
                "anchors and aliases (&name, *name) are not supported; "
                "quote values that start with * or &, such as '*/agent-*'",
                event.start_mark,
            )
        if self._depth >= MAX_DEPTH:
            raise ComposerError(None, None, f"nested deeper than {MAX_DEPTH} levels", event.start_mark)
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


_BRACKETS = re.compile(r"[\[\]{}]")


def _compose(text: str, path: str) -> tuple[list[Node], PolicyError | None]:
    """Root nodes of the non-empty documents, up to the first YAML syntax error (if any).

    libyaml composes a 100k-rule file ~15x faster than PyYAML's pure-Python composer, but it
    cannot refuse anchors or bound depth while it composes. So it is used only when the text
    cannot need either refusal, and its tree is checked afterwards; anything unusual (an
    anchor, deep flow nesting, an alias, a syntax error) goes through the pure-Python composer,
    whose errors are the ones users see. Long CIDR lists take _compose_bulk's shortcut.
    """
    bulk = _compose_bulk(text)
    if bulk is not None:
        return bulk, None
    fast = _compose_libyaml(text)
    return (fast, None) if fast is not None else _compose_python(text, path)


# Long lists of CIDRs, the one part of a policy that grows to 100k entries, cost a YAML node per
# key and value, and composing those is most of a large load even in libyaml. So each run of at
# least BULK_MIN_RUN consecutive lines of exactly this form, at one indentation,
#
#     - cidr: 10.1.0.0/16        (an address with /LEN, or a bare dotted quad; spaces only)
#
# has its inner lines blanked before libyaml composes the text (line numbers stay as they are),
# and their values are read from the regular expression's match instead. That is exact, not a
# guess about YAML, because libyaml must confirm the run's context: the run's first and last
# lines have to come back as consecutive items of one spec.egress[].to list, each a block
# mapping {cidr: VALUE} at the run's column with a plain VALUE equal to what the expression
# read. A line at the column of a block sequence's entries that starts with "- " is that
# sequence's next entry, and such a line cannot continue the plain scalar above it; so given
# the first line is an entry of the list, every line of the run is one too, with that value.
# Anything else (the run inside a block or quoted scalar, a comment or a line break libyaml
# counts but this expression does not, a list elsewhere) fails the check, and the whole text
# is composed as written. VALUE cannot be anything but a string: no implicit YAML type (int,
# float, timestamp, bool, null, merge, value) matches a text with a "/", nor a dotted quad.
BULK_MIN_RUN = 32
_BULK_VALUE = r"(?:[0-9A-Fa-f:.]+/[0-9]{1,3}|[0-9]{1,3}(?:\.[0-9]{1,3}){3})"
_BULK_RUN = re.compile(
    rf"^( *)- cidr: {_BULK_VALUE} *\n(?:\1- cidr: {_BULK_VALUE} *\n)+", re.MULTILINE)
_BULK_ITEM = re.compile(rf"- cidr: ({_BULK_VALUE})")
_OTHER_BREAKS = ("\r", "\x85", "\u2028", "\u2029")  # line breaks for libyaml, not for re


@dataclasses.dataclass(frozen=True, slots=True)
class _Run:
    first: int  # 0-based line of the run's first item, as libyaml counts (marks)
    indent: int  # column of its "-"
    values: list[str]  # every item's value, in order

    @property
    def last(self) -> int:
        return self.first + len(self.values) - 1


def _compose_bulk(text: str) -> list[Node] | None:
    """_compose_libyaml with the shortcut above, or None where it does not apply (no long run,
    or libyaml's tree does not confirm every run): the caller then composes the text as is.

    A run's inner items come back as (VALUE, line) tuples in the list's node.value, between
    the first and last items' nodes; only _rule reads them (see _bulk_cidr_peers).
    """
    if "- cidr: " not in text or any(b in text for b in _OTHER_BREAKS):
        return None
    runs: list[_Run] = []
    pieces: list[str] = []
    pos = line = 0
    for m in _BULK_RUN.finditer(text):
        values = _BULK_ITEM.findall(text, m.start(), m.end())
        if len(values) < BULK_MIN_RUN:
            continue
        line += text.count("\n", pos, m.start())
        second = text.index("\n", m.start()) + 1
        last = text.rindex("\n", m.start(), m.end() - 1) + 1
        pieces += (text[pos:second], "\n" * (len(values) - 2))
        runs.append(_Run(line, len(m.group(1)), values))
        pos = last
        line += text.count("\n", m.start(), last)
    if not runs:
        return None
    pieces.append(text[pos:])
    roots = _compose_libyaml("".join(pieces))
    if roots is None or not _splice_runs(roots, runs):
        return None
    return roots


def _splice_runs(roots: list[Node], runs: list[_Run]) -> bool:
    """Put each run's inner items into the to-list whose items its first and last lines are
    (see above); False unless every run is found exactly so."""
    by_first = {run.first: run for run in runs}
    found = 0
    for seq in _to_lists(roots):
        items: list = []
        for item in seq.value:
            if items and isinstance(items[-1], MappingNode):
                run = by_first.get(items[-1].start_mark.line)
                if run is not None and _run_item(items[-1], run, 0) and _run_item(item, run, -1):
                    del by_first[run.first]
                    found += 1
                    items += ((value, run.first + 1 + i)
                              for i, value in enumerate(run.values[1:-1], start=1))
            items.append(item)
        seq.value = items
    return found == len(runs)


def _run_item(node: Node, run: _Run, index: int) -> bool:
    """Is node the block mapping {cidr: VALUE} of the run's first (0) or last (-1) line?"""
    line = run.first if index == 0 else run.last
    if not (isinstance(node, MappingNode) and node.tag == _MAP and len(node.value) == 1
            and node.start_mark.line == line and node.start_mark.column == run.indent + 2):
        return False
    key, value = node.value[0]
    # plain scalars: style "" from libyaml, None from PyYAML's own composer
    return (isinstance(key, ScalarNode) and key.tag == _STR and not key.style
            and key.value == "cidr" and key.start_mark.line == line
            and isinstance(value, ScalarNode) and value.tag == _STR and not value.style
            and value.value == run.values[index] and value.start_mark.line == line)


def _to_lists(roots: list[Node]) -> Iterator[SequenceNode]:
    """Every spec.egress[].to list node of the documents (all of them, duplicate keys too)."""
    for root in roots:
        for spec in _values_of(root, "spec"):
            for egress in _values_of(spec, "egress"):
                if isinstance(egress, SequenceNode):
                    for rule in egress.value:
                        for to in _values_of(rule, "to"):
                            if isinstance(to, SequenceNode):
                                yield to


def _values_of(node: Node, key: str) -> Iterator[Node]:
    if isinstance(node, MappingNode):
        for k, v in node.value:
            if isinstance(k, ScalarNode) and k.value == key:
                yield v


def _compose_libyaml(text: str) -> list[Node] | None:
    if not getattr(yaml, "__with_libyaml__", False) or "&" in text:
        return None
    # libyaml's composer recurses in C: flow nesting is the only way to nest deeply in a few
    # bytes, so bound it before composing (brackets inside quotes only make this stricter)
    depth = 0
    for m in _BRACKETS.finditer(text):
        depth += 1 if m.group() in "[{" else -1
        if depth >= MAX_DEPTH:
            return None
    loader = yaml.CSafeLoader(text)
    roots: list[Node] = []
    try:
        while loader.check_node():
            root = loader.get_node()
            if root is None or (isinstance(root, ScalarNode) and root.tag == _NULL):
                continue
            roots.append(root)
    except yaml.YAMLError:
        return None
    finally:
        loader.dispose()
    # No alias can be in the tree: without "&" there is no anchor to refer to, and libyaml
    # refuses an undefined alias. Depth is still bounded like the Python composer bounds it.
    stack = [(r, 1) for r in roots if not isinstance(r, ScalarNode)]
    while stack:
        node, level = stack.pop()
        if level >= MAX_DEPTH:
            return None
        children = node.value if isinstance(node, SequenceNode) else \
            [n for pair in node.value for n in pair]
        stack.extend((c, level + 1) for c in children if not isinstance(c, ScalarNode))
    return roots


def _compose_python(text: str, path: str) -> tuple[list[Node], PolicyError | None]:
    roots: list[Node] = []
    loader = None
    try:
        loader = _Loader(text)  # the reader checks for unprintable characters here already
        while loader.check_node():
            root = loader.get_node()
            if root is None or (isinstance(root, ScalarNode) and root.tag == _NULL):
                continue  # empty document (only comments, or a bare ---)
            roots.append(root)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or exc.context or "syntax error"
        if exc.context and exc.problem:
            problem = f"{problem} ({exc.context})"
        if "alias" in problem and "not supported" not in problem:
            problem += "; quote values that start with * or &, such as '*/agent-*'"
        line = mark.line + 1 if mark is not None else None
        return roots, PolicyError(f"invalid YAML: {problem}", path=path, line=line)
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        char = exc.character if isinstance(exc.character, int) else ord(exc.character)
        return roots, PolicyError(
            f"invalid YAML: character U+{char:04X} is not allowed ({exc.reason})", path=path, line=line
        )
    except yaml.YAMLError as exc:
        return roots, PolicyError(f"invalid YAML: {exc}", path=path)
    finally:
        if loader is not None:
            loader.dispose()
    return roots, None


# --- typed node access ----------------------------------------------------------------------


def _line(node: Node) -> int:
    return node.start_mark.line + 1


def _at(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _short(value: str, limit: int = 60) -> str:
    return value if len(value) <= limit else value[: limit - 3] + "..."


def _describe(node: Node) -> str:
    """How a node reads in an error message: 'a list', "the string 'x'", 'the integer 5'."""
    if isinstance(node, MappingNode):
        return "a mapping" if node.tag == _MAP else f"a value tagged {node.tag}"
    if isinstance(node, SequenceNode):
        return "a list" if node.tag == _SEQ else f"a value tagged {node.tag}"
    value = _short(node.value)
    kinds = {_STR: "the string", _INT: "the integer", _BOOL: "the boolean", _TAG + "float": "the number"}
    if node.tag in kinds:
        return f"{kinds[node.tag]} {value!r}" if node.tag == _STR else f"{kinds[node.tag]} {value}"
    if node.tag == _NULL:
        return "an empty value (null)"
    if node.tag in _IMPLICIT_TAGS:  # what YAML makes of some unquoted values
        return f"{value!r} (a YAML {node.tag[len(_TAG):]})"
    return f"a value tagged {node.tag}"


class _Reader:
    """Typed access to the nodes of one file that records every problem instead of raising.

    Each method returns the converted value, or None after recording an error, so a document
    is walked completely and all its problems are reported together.
    """

    def __init__(
        self,
        path: str,
        fqdn_min_labels: int = DEFAULT_FQDN_MIN_LABELS,
        peers: dict[str, CIDRPeer] | None = None,
        known_peers: Mapping[str, CIDRPeer] | None = None,
    ) -> None:
        self.path = path
        self.fqdn_min_labels = fqdn_min_labels  # for fqdnPattern peers (load_policy_text)
        self.errors: list[PolicyError] = []
        # cidr text -> peer: every valid one this file has (PolicyDirLoader keeps them), and
        # those of its previous parse, reused so that an unchanged line costs a lookup
        self.peers: dict[str, CIDRPeer] = {} if peers is None else peers
        self.known_peers: Mapping[str, CIDRPeer] = known_peers or {}

    def error(self, node: Node, where: str, msg: str) -> None:
        self.error_at(_line(node), where, msg)

    def error_at(self, line: int, where: str, msg: str) -> None:
        self.errors.append(PolicyError(f"{where}: {msg}" if where else msg, path=self.path, line=line))

    def cidr_peer(self, text: str) -> CIDRPeer:
        """The peer of a cidr text; ValueError if it is not a CIDR."""
        peer = self.peers.get(text)
        if peer is None:
            peer = self.known_peers.get(text)
            if peer is None:
                peer = _cidr_peer_of(text)
            self.peers[text] = peer
        return peer

    def mapping(
        self, node: Node, where: str, allowed: tuple[str, ...], required: tuple[str, ...] = ()
    ) -> dict[str, Node] | None:
        """The mapping's values by key; unknown, duplicate and missing keys are errors."""
        if not isinstance(node, MappingNode) or node.tag != _MAP:
            self.error(node, where, f"expected a mapping with keys {', '.join(allowed)}, got {_describe(node)}")
            return None
        fields: dict[str, Node] = {}
        suggested: set[str] = set()
        for key_node, value_node in node.value:
            if not isinstance(key_node, ScalarNode):
                self.error(key_node, where, f"keys must be plain strings, got {_describe(key_node)}")
                continue
            key = key_node.value
            if key_node.tag != _STR or key not in allowed:
                hint = difflib.get_close_matches(key, allowed, n=1)
                suggestion = f"; did you mean {hint[0]!r}?" if hint else ""
                suggested.update(hint)
                self.error(
                    key_node,
                    where,
                    f"unknown key {_short(key)!r} (allowed keys: {', '.join(allowed)}){suggestion}",
                )
            elif key in fields:
                self.error(key_node, _at(where, key), "duplicate key")
            else:
                fields[key] = value_node
        for key in required:
            # A misspelt key was already reported with the right spelling.
            if key not in fields and key not in suggested and not any(
                isinstance(k, ScalarNode) and k.value == key for k, _ in node.value
            ):
                self.error(node, where, f"missing required key {key!r}")
        return fields

    def sequence(self, node: Node, where: str, of: str) -> list[Node] | None:
        if not isinstance(node, SequenceNode) or node.tag != _SEQ:
            self.error(node, where, f"expected a list of {of}, got {_describe(node)}")
            return None
        return list(node.value)

    def string(self, node: Node, where: str) -> str | None:
        if not isinstance(node, ScalarNode) or node.tag != _STR:
            hint = "; quote it to make it a string" if node.tag in _IMPLICIT_TAGS else ""
            self.error(node, where, f"expected a string, got {_describe(node)}{hint}")
            return None
        return node.value

    def integer(self, node: Node, where: str, lo: int, hi: int, what: str) -> int | None:
        """A decimal integer in lo..hi; 0x1bb, 0o17, 1_000 and "443" are refused as unclear."""
        if not isinstance(node, ScalarNode) or node.tag != _INT or not _DECIMAL_RE.fullmatch(node.value):
            self.error(node, where, f"expected {what} ({lo}-{hi}) as a decimal integer, got {_describe(node)}")
            return None
        # Length check first: int() of thousands of digits is slow (and limited since 3.11).
        if len(node.value) > 20 or not lo <= int(node.value) <= hi:
            self.error(node, where, f"{_short(node.value)} is not {what} ({lo}-{hi})")
            return None
        return int(node.value)

    def boolean(self, node: Node, where: str) -> bool | None:
        if isinstance(node, ScalarNode) and node.tag == _BOOL and node.value in ("true", "false"):
            return node.value == "true"
        self.error(node, where, f"expected true or false, got {_describe(node)}")
        return None

    def choice(self, node: Node, where: str, choices: Mapping[str, object], what: str) -> object | None:
        text = self.string(node, where)
        if text is None:
            return None
        if text not in choices:
            self.error(node, where, f"{_short(text)!r} is not {what} (expected {_or(choices)})")
            return None
        return choices[text]

    def one_of(
        self, node: Node, where: str, kinds: Mapping[str, object], several: str = ""
    ) -> tuple[str, Node] | None:
        """The single ``{kind: value}`` entry of a mapping whose key picks the kind.

        ``several``: how to fix a mapping that gives more than one kind, added to the error.
        """
        fields = self.mapping(node, where, tuple(kinds))
        if fields is None:
            return None
        if len(fields) != 1:
            if fields or not node.value:  # unknown keys alone were already reported
                msg = f"expected exactly one of: {', '.join(kinds)}"
                if len(fields) > 1 and several:
                    given = list(fields)
                    msg += f" (this entry has {', '.join(given[:-1])} and {given[-1]}; {several})"
                self.error(node, where, msg)
            return None
        return next(iter(fields.items()))


def _or(choices: Iterable[str]) -> str:
    items = list(choices)
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} or {items[-1]}"


# --- the schema -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class _Parsed:
    """What one document contributed: the policy if it is valid, and whichever of its name and
    selector are valid, so that clashes with other documents are reported even for a document
    that has errors of its own."""

    path: str
    line: int
    policy: Policy | None
    name: str | None
    name_line: int
    selector: Selector | None


def _cgroup_path_selector(r: _Reader, node: Node, where: str) -> Selector | None:
    text = r.string(node, where)
    if text is None:
        return None
    try:
        return Selector(cgroup_path=normalize_cgroup_pattern(text), line=_line(node))
    except ValueError as exc:
        r.error(node, where, f"invalid cgroup path pattern: {exc}")
        return None


def _cidr_peer(r: _Reader, node: Node, where: str) -> CIDRPeer | None:
    text = r.string(node, where)
    if text is None:
        return None
    try:
        return r.cidr_peer(text)
    except ValueError as exc:
        r.error(node, where, str(exc))
        return None


def _bulk_cidr_peers(r: _Reader, items: list, start: int, where_to: str, peers: list) -> int:
    """The peers of the (VALUE, line) items _compose_bulk left in a to-list from items[start]
    on, appended to peers, as _cidr_peer gives them for the nodes of the same lines (errors
    included); returns the index of the first item that is a node again. (_Reader.cidr_peer,
    inlined: this loop runs once per line of a 100k-line list.)"""
    seen, known, append, from_key = r.peers, r.known_peers, peers.append, CIDRPeer.from_key
    for i in range(start, len(items)):
        item = items[i]
        if type(item) is not tuple:
            return i
        text = item[0]
        peer = seen.get(text) or known.get(text)
        if peer is None:
            try:
                key = _canonical_key(text)
                peer = from_key(*key) if key is not None else _cidr_peer_of(text)
            except ValueError as exc:
                r.error_at(item[1], f"{where_to}[{i}].cidr", str(exc))
                append(None)
                continue
        seen[text] = peer
        append(peer)
    return len(items)


def _fqdn_peer(r: _Reader, node: Node, where: str) -> FQDNPeer | None:
    text = r.string(node, where)
    if text is None:
        return None
    try:
        return FQDNPeer(name=normalize_name(text))
    except ValueError as exc:
        r.error(node, where, str(exc))
        return None


def _fqdn_pattern_peer(r: _Reader, node: Node, where: str) -> FQDNPatternPeer | None:
    text = r.string(node, where)
    if text is None:
        return None
    try:
        return FQDNPatternPeer(pattern=normalize_pattern(text, r.fqdn_min_labels))
    except ValueError as exc:
        r.error(node, where, str(exc))
        return None


def _systemd_unit_selector(r: _Reader, node: Node, where: str) -> Selector | None:
    text = r.string(node, where)
    if text is None:
        return None
    problem = _unit_glob_problem(text)
    if problem is not None:
        r.error(node, where, f"{_short(text)!r} is not a systemd unit name glob: {problem}")
        return None
    return Selector(systemd_unit=normalize_name_glob(text), line=_line(node))


def _unit_glob_problem(glob: str) -> str | None:
    """What is wrong with a unit name glob, as the rest of a sentence, or None."""
    if len(glob) > _UNIT_MAX:
        return f"longer than {_UNIT_MAX} characters, the limit for unit names"
    bad = sorted(set(glob) - _UNIT_GLOB_CHARS)
    if bad:
        return (
            f"{_or([repr(c) for c in bad])} cannot appear in a unit name (expected letters, digits, "
            "':', '-', '_', '.', '\\', '@' and the wildcards * and ?)"
        )
    suffix = next((s for s in _UNIT_SUFFIXES if glob.endswith(s)), None)
    if suffix is None:
        stem, dot, unit_type = glob.rpartition(".")
        fix = f"{stem}.service" if dot and unit_type in _UNIT_OTHER_TYPES else f"{glob.rstrip('.')}.service"
        return (
            "it must end in .service, .scope or .slice, the units whose cgroups the agent "
            f"selects (did you mean {fix!r}?)"
        )
    if glob == suffix:
        return f"no name before {suffix}"
    if glob.count("@") > 1:
        return "more than one '@' (a template instance is written 'name@instance.service')"
    return None


_KUBERNETES_KEYS = ("namespace", "namespaceSelector", "serviceAccount", "podSelector")


def _kubernetes_selector(r: _Reader, node: Node, where: str) -> Selector | None:
    """Pods by namespace (or namespace labels), service account and pod labels."""
    fields = r.mapping(node, where, _KUBERNETES_KEYS)
    if fields is None:
        return None
    if not fields:
        if not node.value:  # unknown keys alone were already reported
            r.error(
                node,
                where,
                "an empty selector would select every pod on the node; give at least one of "
                f"{_or(_KUBERNETES_KEYS)}, or write 'podSelector: {{}}' if every pod is really meant",
            )
        return None
    before = len(r.errors)
    namespace = service_account = None
    namespace_selector = pod_selector = None
    if "namespace" in fields and "namespaceSelector" in fields:
        r.error(
            fields["namespaceSelector"],
            _at(where, "namespaceSelector"),
            "cannot be combined with namespace (name the namespace, or select namespaces by their "
            "labels, not both)",
        )
    if "namespace" in fields:
        namespace = _dns_name(
            r, fields["namespace"], _at(where, "namespace"), "namespace name", _DNS_LABEL_RE, _DNS_LABEL_MAX
        )
    if "namespaceSelector" in fields:
        namespace_selector = _label_selector(r, fields["namespaceSelector"], _at(where, "namespaceSelector"))
    if "serviceAccount" in fields:
        service_account = _dns_name(
            r,
            fields["serviceAccount"],
            _at(where, "serviceAccount"),
            "service account name",
            _DNS_SUBDOMAIN_RE,
            _DNS_SUBDOMAIN_MAX,
        )
    if "podSelector" in fields:
        pod_selector = _label_selector(r, fields["podSelector"], _at(where, "podSelector"))
    if len(r.errors) > before:
        return None
    kubernetes = KubernetesSelector(
        namespace=namespace,
        namespace_selector=namespace_selector,
        service_account=service_account,
        pod_selector=pod_selector,
    )
    return Selector(kubernetes=kubernetes, line=_line(node))


def _dns_name(
    r: _Reader, node: Node, where: str, what: str, pattern: re.Pattern[str], limit: int
) -> str | None:
    """A Kubernetes object name: a DNS-1123 label or subdomain, as ``pattern`` says."""
    text = r.string(node, where)
    if text is None:
        return None
    if len(text) > limit or not pattern.fullmatch(text):
        dots = ", '-' and '.'" if pattern is _DNS_SUBDOMAIN_RE else " and '-'"
        r.error(
            node,
            where,
            f"{_short(text)!r} is not a valid {what} (expected at most {limit} lower-case letters, "
            f"digits{dots}, starting and ending with a letter or digit)",
        )
        return None
    return text


def _label_selector(r: _Reader, node: Node, where: str) -> LabelSelector | None:
    """A Kubernetes label selector: the node types are checked here, where each node's line is
    known; hostagent.identity.labels then validates the plain values exactly as the API server
    would. Its error (the first one it finds) names a dotted location, which is mapped back to
    the node it came from for the line."""
    fields = r.mapping(node, where, ("matchLabels", "matchExpressions"))
    if fields is None:
        return None
    before = len(r.errors)
    nodes: dict[str, Node] = {where: node}
    plain: dict[str, object] = {}
    if "matchLabels" in fields:
        at = _at(where, "matchLabels")
        nodes[at] = fields["matchLabels"]
        plain["matchLabels"] = _match_labels(r, fields["matchLabels"], at, nodes)
    if "matchExpressions" in fields:
        at = _at(where, "matchExpressions")
        nodes[at] = fields["matchExpressions"]
        plain["matchExpressions"] = _match_expressions(r, fields["matchExpressions"], at, nodes)
    if len(r.errors) > before:
        return None
    try:
        return parse_label_selector(plain, where)
    except PolicyError as exc:
        msg = str(exc)
        at = max((loc for loc in nodes if msg.startswith(f"{loc}: ")), key=len, default=where)
        r.error(nodes[at], "", msg)
        return None


def _match_labels(r: _Reader, node: Node, where: str, nodes: dict[str, Node]) -> dict[str, str] | None:
    if not isinstance(node, MappingNode) or node.tag != _MAP:
        hint = " (write {} for no labels, or leave matchLabels out)" if node.tag == _NULL else ""
        r.error(node, where, f"expected a mapping of label keys to values, got {_describe(node)}{hint}")
        return None
    labels: dict[str, str] = {}
    for key_node, value_node in node.value:
        key = r.string(key_node, where)
        if key is None:
            continue
        at = f"{where}[{_short(key)!r}]"  # as hostagent.identity.labels spells it
        if key in labels:
            r.error(key_node, at, "duplicate key")
            continue
        nodes.setdefault(at, key_node)
        value = _label_string(r, value_node, at)
        if value is not None:
            labels[key] = value
    return labels


def _match_expressions(
    r: _Reader, node: Node, where: str, nodes: dict[str, Node]
) -> list[dict[str, object]] | None:
    if node.tag == _NULL:
        r.error(node, where, "expected a list of {key, operator, values} requirements, got an empty "
                "value (null) (write [] for none, or leave matchExpressions out)")
        return None
    items = r.sequence(node, where, "{key, operator, values} requirements")
    requirements: list[dict[str, object]] = []
    for i, item in enumerate(items or ()):
        at = f"{where}[{i}]"
        nodes[at] = item
        fields = r.mapping(item, at, ("key", "operator", "values"), required=("key", "operator"))
        if fields is None:
            continue
        requirement: dict[str, object] = {}
        for key in ("key", "operator"):
            if key in fields:
                nodes[_at(at, key)] = fields[key]
                requirement[key] = r.string(fields[key], _at(at, key))
        values = fields.get("values")
        values_at = _at(at, "values")
        if values is not None:
            nodes[values_at] = values
        if values is not None and values.tag != _NULL:  # null: as if left out, as the API server reads it
            strings = []
            for j, value in enumerate(r.sequence(values, values_at, "label values") or ()):
                nodes[f"{values_at}[{j}]"] = value
                strings.append(_label_string(r, value, f"{values_at}[{j}]"))
            requirement["values"] = strings
        requirements.append(requirement)
    return requirements


def _label_string(r: _Reader, node: Node, where: str) -> str | None:
    if node.tag == _NULL:
        r.error(node, where, "expected a string label value, got an empty value (null); write '' for an empty value")
        return None
    return r.string(node, where)


def _container_selector(r: _Reader, node: Node, where: str) -> Selector | None:
    """Containers by runtime id and/or Kubernetes container name."""
    fields = r.mapping(node, where, ("id", "name"))
    if fields is None:
        return None
    if not fields:
        if not node.value:  # unknown keys alone were already reported
            r.error(node, where, "expected id, name or both (an empty selector would select every container)")
        return None
    before = len(r.errors)
    container_id = name = None
    if "id" in fields:
        container_id = _container_id(r, fields["id"], _at(where, "id"))
    if "name" in fields:
        name = _dns_name(
            r, fields["name"], _at(where, "name"), "container name", _DNS_LABEL_RE, _DNS_LABEL_MAX
        )
    if len(r.errors) > before:
        return None
    return Selector(container=ContainerSelector(id=container_id, name=name), line=_line(node))


def _container_id(r: _Reader, node: Node, where: str) -> str | None:
    text = r.string(node, where)
    if text is None:
        return None
    expected = (
        f"expected the full {_CONTAINER_ID_LEN}-digit hex id, or a prefix of at least "
        f"{_CONTAINER_ID_MIN} digits, in lower case"
    )
    scheme, sep, bare = text.partition("://")
    if sep:
        r.error(node, where, f"{_short(text)!r} is not a container id ({expected}); leave out {scheme + sep!r}")
    elif _CONTAINER_ID_RE.fullmatch(text.lower()) and not _CONTAINER_ID_RE.fullmatch(text):
        r.error(node, where, f"{_short(text)!r} is not a container id ({expected}); write {text.lower()!r}")
    elif not _CONTAINER_ID_RE.fullmatch(text):
        r.error(node, where, f"{_short(text)!r} is not a container id ({expected})")
    elif not _CONTAINER_ID_MIN <= len(text) <= _CONTAINER_ID_LEN:
        r.error(node, where, f"{_short(text)!r} has {len(text)} hex digits ({expected})")
    else:
        return text
    return None


# Kinds of selector and of peer, by YAML key. Each parser returns the model object or None after
# recording an error. Policies of different selector kinds may select the same cgroup: the kind's
# precedence (SelectorKind) decides, so only policies of one kind are checked against each other.
_SELECTORS: dict[str, Callable[[_Reader, Node, str], Selector | None]] = {
    "cgroupPath": _cgroup_path_selector,
    "systemdUnit": _systemd_unit_selector,
    "kubernetes": _kubernetes_selector,
    "container": _container_selector,
}
_PEERS: dict[str, Callable[[_Reader, Node, str], Peer | None]] = {
    "cidr": _cidr_peer,
    "fqdn": _fqdn_peer,
    "fqdnPattern": _fqdn_pattern_peer,
}


def _port_range(r: _Reader, node: Node, where: str) -> PortRange | None:
    fields = r.mapping(node, where, ("port", "endPort", "protocol"), required=("port",))
    if fields is None:
        return None
    first = last = None
    if "port" in fields:
        first = last = r.integer(fields["port"], _at(where, "port"), 1, 65535, "a port number")
    if "endPort" in fields:
        last = r.integer(fields["endPort"], _at(where, "endPort"), 1, 65535, "a port number")
    protocols = Protocol.TCP
    if "protocol" in fields:
        protocols = r.choice(fields["protocol"], _at(where, "protocol"), _PROTOCOLS, "a protocol")
    if first is not None and last is not None and last < first:
        r.error(fields["endPort"], _at(where, "endPort"), f"{last} is less than port {first} (expected endPort >= port)")
        return None
    if first is None or last is None or protocols is None:
        return None
    return PortRange(first=first, last=last, protocols=protocols)


def _rule(r: _Reader, node: Node, where: str, index: int) -> tuple[EgressRule | None, str | None]:
    """One egress rule (None if invalid), and its name if that is valid (for duplicate checks)."""
    fields = r.mapping(node, where, ("name", "to", "ports", "ticket"))
    if fields is None:
        return None, None
    before = len(r.errors)
    name: str | None = f"egress[{index}]"
    if "name" in fields:
        name = r.string(fields["name"], _at(where, "name"))
        if name is not None and not (0 < len(name) <= _NAME_MAX and name.isprintable()):
            r.error(fields["name"], _at(where, "name"), f"expected 1-{_NAME_MAX} printable characters")
            name = None
    ticket = _ticket(r, fields, where)
    peers: list[Peer | None] = []
    if "to" in fields:
        where_to = _at(where, "to")
        items = r.sequence(fields["to"], where_to, "peers")
        if items == []:
            r.error(
                fields["to"],
                where_to,
                "an empty list would allow nothing; omit 'to' to allow any destination, or list peers",
            )
        i = 0
        items = items or []
        while i < len(items):
            item = items[i]
            if type(item) is tuple:  # lines of a long list of CIDRs, see _compose_bulk
                i = _bulk_cidr_peers(r, items, i, where_to, peers)
                continue
            picked = r.one_of(
                item, f"{where_to}[{i}]", _PEERS, several="write each peer as its own list item"
            )
            if picked is not None:
                kind, value = picked
                peers.append(_PEERS[kind](r, value, _at(f"{where_to}[{i}]", kind)))
            i += 1
    ports: list[PortRange | None] = []
    if "ports" in fields:
        where_ports = _at(where, "ports")
        for i, item in enumerate(r.sequence(fields["ports"], where_ports, "ports") or ()):
            ports.append(_port_range(r, item, f"{where_ports}[{i}]"))
    if len(r.errors) > before or name is None:
        return None, name
    rule = EgressRule(
        index=index, name=name, to=tuple(peers), ports=tuple(ports), line=_line(node),  # type: ignore[arg-type]
        ticket=ticket,
    )
    return rule, name


def _ticket(r: _Reader, fields: dict, where: str) -> str | None:
    """A change ticket reference (CHG-1234, a URL): free text, printable, one line."""
    if "ticket" not in fields:
        return None
    ticket = r.string(fields["ticket"], _at(where, "ticket"))
    if ticket is not None and not (0 < len(ticket) <= _TICKET_MAX and ticket.isprintable()):
        r.error(fields["ticket"], _at(where, "ticket"),
                f"expected 1-{_TICKET_MAX} printable characters on one line")
        return None
    return ticket


def _egress(r: _Reader, node: Node, where: str) -> tuple[EgressRule, ...] | None:
    """The rules; names must be unique within the policy so events can name the rule."""
    items = r.sequence(node, where, "rules")
    if items is None:
        return None
    before = len(r.errors)
    rules: list[EgressRule] = []
    first_by_name: dict[str, int] = {}
    for index, item in enumerate(items):
        rule, name = _rule(r, item, f"{where}[{index}]", index)
        if name is not None:
            first = first_by_name.setdefault(name, index)
            if first != index:
                r.error(
                    _name_node(item) or item,
                    f"{where}[{index}].name",
                    f"rule name {name!r} is already used by {where}[{first}]",
                )
        if rule is not None:
            rules.append(rule)
    return tuple(rules) if len(r.errors) == before else None


def _name_node(node: Node) -> Node | None:
    """The value node of a mapping's "name" key, for pointing errors at it."""
    if isinstance(node, MappingNode):
        for key, value in node.value:
            if isinstance(key, ScalarNode) and key.value == "name":
                return value
    return None


def _spec(r: _Reader, node: Node) -> dict[str, object]:
    """The spec's parts by model field name; an invalid part is None (its error is recorded)."""
    fields = r.mapping(node, "spec", ("selector", "mode", "allowRawSockets", "egress"), required=("selector",))
    if fields is None:
        return {"selector": None}
    out: dict[str, object] = {"selector": None, "mode": Mode.ENFORCE, "allow_raw_sockets": False, "egress": ()}
    if "selector" in fields:
        picked = r.one_of(fields["selector"], "spec.selector", _SELECTORS)
        if picked is not None:
            kind, value = picked
            out["selector"] = _SELECTORS[kind](r, value, f"spec.selector.{kind}")
    if "mode" in fields:
        out["mode"] = r.choice(fields["mode"], "spec.mode", _MODES, "a mode")
    if "allowRawSockets" in fields:
        out["allow_raw_sockets"] = r.boolean(fields["allowRawSockets"], "spec.allowRawSockets")
    if "egress" in fields:
        out["egress"] = _egress(r, fields["egress"], "spec.egress")
    return out


def _metadata(r: _Reader, node: Node) -> tuple[str | None, Node, str | None]:
    """The policy name if valid, the node errors about the name should point at, and the
    policy's change ticket."""
    meta = r.mapping(node, "metadata", ("name", "ticket"), required=("name",))
    if not meta or "name" not in meta:
        return None, node, None
    ticket = _ticket(r, meta, "metadata")
    name = r.string(meta["name"], "metadata.name")
    if name is not None and not (len(name) <= _NAME_MAX and _NAME_RE.fullmatch(name)):
        r.error(
            meta["name"],
            "metadata.name",
            f"{_short(name)!r} is not a valid policy name (expected at most {_NAME_MAX} "
            "lower-case letters, digits, '-' and '.', starting and ending with a letter or digit)",
        )
        name = None
    return name, meta["name"], ticket


def _policy(r: _Reader, root: Node) -> _Parsed | None:
    """One document; None if it is not even an EgressPolicy mapping."""
    keys = ("apiVersion", "kind", "metadata", "spec")
    fields = r.mapping(root, "", keys, required=keys)
    if fields is None:
        return None
    before = len(r.errors)
    for key, expected in (("apiVersion", API_VERSION), ("kind", KIND)):
        if key in fields:
            value = r.string(fields[key], key)
            if value is not None and value != expected:
                r.error(fields[key], key, f"{_short(value)!r} is not supported (expected {expected})")
    if len(r.errors) > before:
        return None  # another version or kind: its schema may differ, so stop here
    name, name_node, ticket = (_metadata(r, fields["metadata"]) if "metadata" in fields
                               else (None, root, None))
    spec = _spec(r, fields["spec"]) if "spec" in fields else {"selector": None}
    policy = None
    if len(r.errors) == before and name is not None and None not in spec.values():
        policy = Policy(
            name=name,
            selector=spec["selector"],  # type: ignore[arg-type]
            mode=spec["mode"],  # type: ignore[arg-type]
            allow_raw_sockets=spec["allow_raw_sockets"],  # type: ignore[arg-type]
            egress=spec["egress"],  # type: ignore[arg-type]
            path=r.path,
            line=_line(root),
            ticket=ticket,
        )
    return _Parsed(
        path=r.path,
        line=_line(root),
        policy=policy,
        name=name,
        name_line=_line(name_node),
        selector=spec["selector"],  # type: ignore[arg-type]
    )


def _parse_text(
    text: str,
    path: str,
    fqdn_min_labels: int = DEFAULT_FQDN_MIN_LABELS,
    peers: dict[str, CIDRPeer] | None = None,
    known_peers: Mapping[str, CIDRPeer] | None = None,
) -> tuple[list[_Parsed], list[PolicyError]]:
    """The documents of one file, and its errors. ``peers`` and ``known_peers`` as for
    _Reader: filled with the file's cidr peers, and the peers of its previous parse."""
    roots, syntax_error = _compose(text, path)
    r = _Reader(path, fqdn_min_labels, peers, known_peers)
    parsed = [p for p in (_policy(r, root) for root in roots) if p is not None]
    errors = sorted(r.errors, key=lambda e: e.context.get("line") or 0)
    if syntax_error is not None:
        errors.append(syntax_error)
    return parsed, errors


# --- checks across policies -----------------------------------------------------------------


def _label(p: _Parsed) -> str:
    return repr(p.name) if p.name is not None else f"at {p.path}:{p.line}"


def _candidate_pairs(group: list[_Parsed]) -> list[tuple[_Parsed, _Parsed]]:
    """The pairs of ``group`` (in order) that may overlap. Patterns whose first segments are
    different literals cannot, which keeps large sets of per-workload policies fast."""
    by_first: dict[str | None, list[int]] = defaultdict(list)
    for index, p in enumerate(group):
        first = p.selector.cgroup_path.split("/")[1]  # type: ignore[union-attr]
        literal = first and not any(c in first for c in "*?")
        by_first[first if literal else None].append(index)
    wild = by_first.pop(None, [])
    pairs = {pair for indexes in by_first.values() for pair in itertools.combinations(indexes, 2)}
    pairs.update((min(w, i), max(w, i)) for w in wild for i in range(len(group)) if i != w)
    return [(group[i], group[j]) for i, j in sorted(pairs)]


def _check_set(parsed: list[_Parsed]) -> list[PolicyError]:
    """Names must be unique, and two policies of the same selector kind must not tie over a cgroup:
    neither would take precedence, so the outcome would depend on load order.

    Policies of different kinds never clash here: SelectorKind's precedence decides between them.
    Within a kind, what can be decided from the text alone is an error:

    * cgroupPath and systemdUnit: equal specificity and globs that can match the same path or
      unit name (decided exactly, whether or not such a cgroup exists now);
    * kubernetes: identical selectors (the same namespace, service account and label
      requirements). Whether two different selectors ever match the same pod depends on labels
      that change at runtime, so such ties are resolved by the agent when they happen: it fails
      closed, giving the pod a deny-all "selector_conflict" binding, and reports the conflict;
    * container: identical selectors, or the same name with ids of which one is a prefix of the
      other (the shorter prefix selects every container the longer one does).
    """
    errors: list[PolicyError] = []
    first_by_name: dict[str, _Parsed] = {}
    by_kind: dict[SelectorKind, list[_Parsed]] = defaultdict(list)
    for p in parsed:
        if p.name is not None:
            first = first_by_name.setdefault(p.name, p)
            if first is not p:
                errors.append(
                    PolicyError(
                        f"metadata.name: policy name {p.name!r} is already used at "
                        f"{first.path}:{first.name_line}",
                        path=p.path,
                        line=p.name_line,
                    )
                )
                continue  # a copy of another policy: one error about it is enough
        if p.selector is not None:
            by_kind[p.selector.kind].append(p)
    errors.extend(_check_cgroup_paths(by_kind[SelectorKind.CGROUP_PATH]))
    errors.extend(_check_systemd_units(by_kind[SelectorKind.SYSTEMD_UNIT]))
    errors.extend(_check_kubernetes(by_kind[SelectorKind.KUBERNETES]))
    errors.extend(_check_containers(by_kind[SelectorKind.CONTAINER]))
    return errors


def _clash(kind: str, a: _Parsed, b: _Parsed, what: str, fix: str) -> PolicyError:
    """The error about ``b`` selecting what ``a`` (parsed earlier) already does."""
    return PolicyError(
        f"spec.selector.{kind}: policies {_label(a)} ({a.path}:{a.selector.line}) "  # type: ignore[union-attr]
        f"and {_label(b)} {what}; {fix}",
        path=b.path,
        line=b.selector.line,  # type: ignore[union-attr]
    )


def _check_cgroup_paths(policies: list[_Parsed]) -> list[PolicyError]:
    errors: list[PolicyError] = []
    by_specificity: dict[tuple[int, int], list[_Parsed]] = defaultdict(list)
    for p in policies:
        by_specificity[specificity(p.selector.cgroup_path)].append(p)  # type: ignore[union-attr, arg-type]
    for spec, group in by_specificity.items():
        for a, b in _candidate_pairs(group):
            pa, pb = a.selector.cgroup_path, b.selector.cgroup_path  # type: ignore[union-attr]
            example = overlap_example(pa, pb)
            if example is None:
                continue
            if pa == pb:
                what = f"both select {pa!r}"
            else:
                what = f"both select {example!r} (patterns {pa!r} and {pb!r})"
            errors.append(
                _clash(
                    "cgroupPath",
                    a,
                    b,
                    f"have equal specificity {spec} and {what}",
                    "make one pattern more specific or merge the policies",
                )
            )
    return errors


def _check_systemd_units(policies: list[_Parsed]) -> list[PolicyError]:
    """As for cgroup paths, with a unit name glob being a one-segment pattern."""
    errors: list[PolicyError] = []
    by_specificity: dict[tuple[int, int], list[_Parsed]] = defaultdict(list)
    for p in policies:
        by_specificity[name_glob_specificity(p.selector.systemd_unit)].append(p)  # type: ignore[union-attr, arg-type]
    for spec, group in by_specificity.items():
        # Two literal names overlap only if they are equal: compare globs with everything, and
        # literal names only with their equals, to stay fast for many per-unit policies.
        literal: dict[str, list[int]] = defaultdict(list)
        wild: list[int] = []
        for index, p in enumerate(group):
            unit = p.selector.systemd_unit  # type: ignore[union-attr]
            (wild if "*" in unit or "?" in unit else literal[unit]).append(index)  # type: ignore[operator]
        pairs = {pair for indexes in literal.values() for pair in itertools.combinations(indexes, 2)}
        pairs.update((min(w, i), max(w, i)) for w in wild for i in range(len(group)) if i != w)
        for i, j in sorted(pairs):
            a, b = group[i], group[j]
            ua, ub = a.selector.systemd_unit, b.selector.systemd_unit  # type: ignore[union-attr]
            example = name_glob_overlap_example(ua, ub)  # type: ignore[arg-type]
            if example is None:
                continue
            what = f"both select {ua!r}" if ua == ub else f"both select {example!r} (patterns {ua!r} and {ub!r})"
            errors.append(
                _clash(
                    "systemdUnit",
                    a,
                    b,
                    f"have equal specificity {spec} and {what}",
                    "make one pattern more specific or merge the policies",
                )
            )
    return errors


def _requirements(selector: LabelSelector | None) -> frozenset[tuple[str, str, tuple[str, ...]]]:
    """What a label selector requires, with ``matchLabels`` entries written as the ``In``
    requirements they are, so that equal requirements compare equal however they were spelt."""
    if selector is None:
        return frozenset()
    labels = {(key, "In", (value,)) for key, value in selector.match_labels}
    return frozenset(labels | {(q.key, q.operator, q.values) for q in selector.match_expressions})


def _check_kubernetes(policies: list[_Parsed]) -> list[PolicyError]:
    """Identical selectors only: see _check_set. Identical means the same specificity and the same
    requirements, so an omitted podSelector and ``podSelector: {}`` are the same, and so are
    ``matchLabels: {app: a}`` and ``{key: app, operator: In, values: [a]}``."""
    errors: list[PolicyError] = []
    first_by_key: dict[object, _Parsed] = {}
    for p in policies:
        k: KubernetesSelector = p.selector.kubernetes  # type: ignore[union-attr, assignment]
        key = (
            k.specificity(),
            k.namespace,
            k.service_account,
            _requirements(k.namespace_selector),
            _requirements(k.pod_selector),
        )
        first = first_by_key.setdefault(key, p)
        if first is not p:
            errors.append(
                _clash(
                    "kubernetes",
                    first,
                    p,
                    "both select the same pods (their selectors state the same requirements)",
                    "merge the policies, or make one selector more specific",
                )
            )
    return errors


def _check_containers(policies: list[_Parsed]) -> list[PolicyError]:
    """Identical selectors, and ids one of which is a prefix of the other with the same name (or
    both without one): these select the same container with the same specificity."""
    errors: list[PolicyError] = []
    by_name: dict[str | None, list[int]] = defaultdict(list)
    first_without_id: dict[str | None, _Parsed] = {}
    for index, p in enumerate(policies):
        c: ContainerSelector = p.selector.container  # type: ignore[union-attr, assignment]
        if c.id is not None:
            by_name[c.name].append(index)
            continue
        first = first_without_id.setdefault(c.name, p)
        if first is not p:
            what = f"both select the containers named {c.name!r} (their selectors are identical)"
            errors.append(_clash("container", first, p, what, "merge the policies"))
    found: list[tuple[int, int]] = []
    for indexes in by_name.values():
        # Sorted by id, every id that starts with a given id directly follows it.
        ordered = sorted(indexes, key=lambda i: (policies[i].selector.container.id, i))  # type: ignore[union-attr]
        for n, i in enumerate(ordered):
            prefix = policies[i].selector.container.id  # type: ignore[union-attr]
            for j in ordered[n + 1 :]:
                if not policies[j].selector.container.id.startswith(prefix):  # type: ignore[union-attr]
                    break
                found.append((min(i, j), max(i, j)))
    for i, j in sorted(found):
        a, b = policies[i], policies[j]
        ca, cb = a.selector.container, b.selector.container  # type: ignore[union-attr]
        if ca == cb:
            what = f"both select the container {_container_text(ca)} (their selectors are identical)"
            fix = "merge the policies"
        else:
            shorter, longer = sorted((ca, cb), key=lambda c: len(c.id))  # type: ignore[union-attr, arg-type]
            what = (
                f"both select the container {_container_text(longer)} with equal specificity "  # type: ignore[arg-type]
                f"(id {shorter.id!r} is a prefix of {longer.id!r})"  # type: ignore[union-attr]
            )
            fix = "use the same id in both and merge the policies, or tell the containers apart by name"
        errors.append(_clash("container", a, b, what, fix))
    return errors


def _container_text(c: ContainerSelector) -> str:
    parts = [f"id {c.id!r}" if c.id is not None else "", f"named {c.name!r}" if c.name is not None else ""]
    return " ".join(part for part in parts if part)


def _finish(parsed: list[_Parsed], errors: list[PolicyError]) -> list[Policy]:
    errors = errors + _check_set(parsed)
    if errors:
        raise PolicyErrors(errors)
    policies = [p.policy for p in parsed if p.policy is not None]
    return sorted(policies, key=lambda p: (p.name, p.path, p.line))
