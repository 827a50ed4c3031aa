#!/usr/bin/env bash
# Idempotent machine + project set-up, shared by `make run` and `make test` (and so by CI).
#
# What a fresh Debian 12 machine lacks for hostagent, and why:
#   - bcc:       Debian's python3-bpfcc (the PyPI "bcc" is an unrelated package);
#   - headers:   bcc compiles our C at start and needs kernel headers. Kernels without packaged
#                headers (this kind of VM) get Debian's linux-headers-<arch>: our programs use only
#                uapi structs, which are stable across kernel versions, so older headers are fine;
#   - bpftool:   `hostagent status` and the benchmarks read per-program run times with it;
#   - nftables:  the benchmark's baseline;
#   - a virtualenv with the Python dependencies, and bcc linked into it.
# Each step checks first, so a second run costs a fraction of a second.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf 'setup: %s\n' "$*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
  say "hostagent loads eBPF programs and must be set up and run as root"; exit 1
fi

# curl and systemd (systemd-analyze): the packaging tests run the docs' probe and verify the unit;
# postgresql: the collector's PostgreSQL store is tested against a private throwaway server
HOST_PACKAGES_WHO=setup scripts/host-packages.sh install \
  python3-bpfcc bpftool iproute2 nftables gcc python3-venv curl systemd postgresql

# The virtualenv. Re-installed only when pyproject.toml changed.
py=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  say "creating .venv"
  "$py" -m venv .venv
fi
stamp=.venv/.hostagent-installed
sum=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$sum" ]; then
  say "installing Python dependencies"
  .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
  echo "$sum" > "$stamp"
fi
# bcc is pure Python over ctypes: link Debian's package into the venv rather than putting all of
# dist-packages on the path.
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
[ -e "$site/bcc" ] || ln -sfn /usr/lib/python3/dist-packages/bcc "$site/bcc"
.venv/bin/python -c 'import bcc' || { say "bcc does not import in .venv"; exit 1; }

# Python code generated from proto/ (the event API), into the package as hostagent/v1/ (the
# proto package's own path). Not committed: regenerated whenever a .proto file changes, and
# tests/test_api_proto.py fails if what is installed differs from what protoc makes now.
proto_sum=$(cat proto/hostagent/v1/*.proto pyproject.toml | sha256sum | cut -d' ' -f1)
proto_stamp=hostagent/v1/.generated-from
if [ ! -f "$proto_stamp" ] || [ "$(cat "$proto_stamp")" != "$proto_sum" ]; then
  say "generating hostagent/v1 from proto/"
  rm -rf hostagent/v1 && mkdir -p hostagent/v1
  .venv/bin/python -m grpc_tools.protoc -Iproto --python_out=. --pyi_out=. --grpc_python_out=. \
    proto/hostagent/v1/*.proto
  echo "$proto_sum" > "$proto_stamp"
fi
