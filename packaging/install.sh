#!/usr/bin/env bash
# Install, upgrade or remove hostagent as a systemd service on a Debian or Ubuntu VM
# (docs/deploy-vm.md). Run from a checkout of the repository, as root:
#
#   packaging/install.sh                     install or upgrade; enable and (re)start the unit
#   packaging/install.sh --uninstall         stop and disable the unit, remove enforcement
#                                            (hostagent uninstall) and the installed files;
#                                            the config and state stay
#   packaging/install.sh --uninstall --keep-enforcement   ... but leave the pinned programs
#                                            enforcing the last policy (no agent: no DNS answers
#                                            for governed workloads, no events)
#   packaging/install.sh --uninstall --purge ... and remove the config, state and logs too
#
# Where things go (flag, or environment variable, default):
#   --prefix DIR     HOSTAGENT_PREFIX     /opt/hostagent        versions/<v>/ (virtualenv, bpf
#                                                               sources, helper), current -> one
#   --etc-dir DIR    HOSTAGENT_ETC_DIR    /etc/hostagent        hostagent.yaml, policies/,
#                                                               hostagent.env (written once)
#   --unit-dir DIR   HOSTAGENT_UNIT_DIR   /etc/systemd/system   hostagent.service
#   --bin-dir DIR    HOSTAGENT_BIN_DIR    /usr/local/bin        hostagent -> current/bin/hostagent
#   --state-dir DIR  HOSTAGENT_STATE_DIR  /var/lib/hostagent    removed by --purge only
#   --log-dir DIR    HOSTAGENT_LOG_DIR    /var/log/hostagent    removed by --purge only
#   --no-deps        HOSTAGENT_NO_DEPS=1  do not install Debian packages or link kernel headers
#   --no-start       HOSTAGENT_NO_START=1 install only: do not enable or (re)start the unit
#   PYTHON                                /usr/bin/python3      the interpreter python3-bpfcc is for
#
# An upgrade builds the new version next to the running one, checks the existing config and
# policies with it, then switches `current` and restarts the unit: the old agent stops leaving
# its programs pinned (the node stays enforced), the new one takes them over atomically. If the
# new agent does not become ready, `current` goes back to the previous version.
set -euo pipefail

say() { printf 'install.sh: %s\n' "$*" >&2; }
die() { say "$*"; exit 1; }

src=$(cd "$(dirname "$0")/.." && pwd)
prefix=${HOSTAGENT_PREFIX:-/opt/hostagent}
etc=${HOSTAGENT_ETC_DIR:-/etc/hostagent}
unit_dir=${HOSTAGENT_UNIT_DIR:-/etc/systemd/system}
bin_dir=${HOSTAGENT_BIN_DIR:-/usr/local/bin}
state_dir=${HOSTAGENT_STATE_DIR:-/var/lib/hostagent}
log_dir=${HOSTAGENT_LOG_DIR:-/var/log/hostagent}
deps=$([ -n "${HOSTAGENT_NO_DEPS:-}" ] && echo no || echo yes)
start=$([ -n "${HOSTAGENT_NO_START:-}" ] && echo no || echo yes)
py=${PYTHON:-/usr/bin/python3}
action=install keep=no purge=no

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit "${1:-0}"; }
while [ $# -gt 0 ]; do
  case $1 in
    --prefix) prefix=$2; shift ;;
    --etc-dir) etc=$2; shift ;;
    --unit-dir) unit_dir=$2; shift ;;
    --bin-dir) bin_dir=$2; shift ;;
    --state-dir) state_dir=$2; shift ;;
    --log-dir) log_dir=$2; shift ;;
    --no-deps) deps=no ;;
    --no-start) start=no ;;
    --uninstall) action=uninstall ;;
    --keep-enforcement) keep=yes ;;
    --purge) purge=yes ;;
    -h|--help) usage 0 ;;
    *) say "unknown argument: $1"; usage 2 ;;
  esac
  shift
done
for d in "$prefix" "$etc" "$unit_dir" "$bin_dir" "$state_dir" "$log_dir"; do
  case $d in /*) ;; *) die "paths must be absolute: $d" ;; esac
done
[ "$(id -u)" -eq 0 ] || die "hostagent loads eBPF programs: run this as root"

unit="$unit_dir/hostagent.service"
current="$prefix/current"

# rm -rf only below a directory of its own, never "/" or a top-level directory such as /opt.
remove_tree() {
  case $1 in
    /|/*/..*|*/../*) die "refusing to remove $1" ;;
    /*/*) rm -rf -- "$1" ;;
    *) die "refusing to remove $1" ;;
  esac
}

# systemd manages units only when it is PID 1 (sd_booted(3): /run/systemd/system exists), and
# only from the directories it reads: never enable a unit written to a scratch directory.
systemd_running() { [ -d /run/systemd/system ]; }
manages_unit() {  # $1: what would be done, for the message when it is not
  [ "$start" = yes ] || return 1
  if ! systemd_running; then
    say "systemd is not running (PID 1 is $(cat /proc/1/comm 2>/dev/null || echo unknown)):" \
        "not $1 hostagent.service"
    return 1
  fi
  case $unit_dir in
    /etc/systemd/system|/run/systemd/system|/usr/lib/systemd/system|/lib/systemd/system) ;;
    *) say "$unit_dir is not a directory systemd loads units from: not $1" \
           "hostagent.service"; return 1 ;;
  esac
}

# ---------------------------------------------------------------------------------------------
# Removal

if [ "$action" = uninstall ]; then
  if manages_unit "stopping or disabling" && systemctl cat hostagent.service >/dev/null 2>&1
  then
    say "stopping and disabling hostagent.service"
    systemctl disable --now hostagent.service
  elif [ -f "$state_dir/status.json" ] || [ -d "$etc" ]; then
    say "if an agent still runs outside systemd, stop it: the files it runs from go next"
  fi
  if [ "$keep" = yes ]; then
    say "keeping enforcement: the pinned programs go on judging connections with the last" \
        "policy until \`hostagent uninstall\`"
  elif [ -x "$current/bin/hostagent" ]; then
    cfg=()
    [ -f "$etc/hostagent.yaml" ] && cfg=(--config "$etc/hostagent.yaml")
    "$current/bin/hostagent" uninstall "${cfg[@]}"
  else
    say "no hostagent under $prefix: nothing to detach with (run \`hostagent uninstall\`" \
        "from another install if programs are still pinned)"
  fi
  rm -f "$unit"
  case $(readlink "$bin_dir/hostagent" 2>/dev/null) in "$current"/*) rm -f "$bin_dir/hostagent" ;; esac
  systemd_running && [ "$start" = yes ] && systemctl daemon-reload
  remove_tree "$prefix"
  if [ "$purge" = yes ]; then
    for d in "$etc" "$state_dir" "$log_dir"; do remove_tree "$d"; done
    say "removed $prefix, $unit, $etc, $state_dir and $log_dir"
  else
    say "removed $prefix and $unit; kept $etc and $state_dir (--purge removes them)"
  fi
  exit 0
fi

# ---------------------------------------------------------------------------------------------
# Host prerequisites: scripts/host-packages.sh, which scripts/setup.sh uses too; only what the
# agent needs at run time. python3-bpfcc: bcc (not the unrelated PyPI "bcc"); util-linux:
# mountpoint for ExecStartPre.

if [ "$deps" = yes ]; then
  HOST_PACKAGES_WHO=install.sh "$src/scripts/host-packages.sh" install \
    python3 python3-venv python3-bpfcc util-linux || die "host packages failed (above)"
fi
"$src/scripts/host-packages.sh" has-headers || [ -n "${BCC_KERNEL_SOURCE:-}" ] ||
  say "warning: no kernel headers for $(uname -r): the agent will not start (docs/deploy-vm.md," \
      "Troubleshooting)"
[ -x "$py" ] || die "$py not found (set PYTHON)"
"$py" -c 'import bcc' 2>/dev/null || die "$py cannot import bcc: install python3-bpfcc"

# ---------------------------------------------------------------------------------------------
# The new version, built next to the running one

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
stage="$work/src"
mkdir -p "$stage"
# Only what the package is built from; the checkout itself is never written to.
cp "$src/pyproject.toml" "$src/README.md" "$stage/"
mkdir "$stage/extra"
cp "$src/packaging/systemd/hostagent-wait-ready" "$src/docs/deploy-vm.md" "$stage/extra/"
parts=(hostagent bpf)
[ -d "$src/proto" ] && parts+=(proto)
tar -C "$src" --exclude=__pycache__ --exclude='*.pyc' --anchored --exclude=hostagent/v1 \
  -cf - "${parts[@]}" |
  tar -C "$stage" -xf -
version=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' "$stage/hostagent/__init__.py")
[ -n "$version" ] || die "no __version__ in hostagent/__init__.py"
# The build is named by version and content, so a changed checkout with an unchanged version
# never overwrites the files a running agent may still import from.
digest=$(cd "$stage" && find . -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum |
         sha256sum | cut -c1-12)
name="$version-$digest"
vdir="$prefix/versions/$name"

if [ -f "$vdir/.complete" ]; then
  say "hostagent $version ($digest) is already built in $vdir"
else
  if [ -d "$stage/proto" ]; then
    # The event API's Python code is generated from proto/ (not committed), as scripts/setup.sh
    # does for the development virtualenv; grpcio-tools is needed for this step only.
    say "generating hostagent/v1 from proto/"
    "$py" -m venv "$work/protoc"
    "$work/protoc/bin/pip" install -q --disable-pip-version-check grpcio-tools
    (cd "$stage" && "$work/protoc/bin/python" -m grpc_tools.protoc -Iproto \
       --python_out=. --pyi_out=. --grpc_python_out=. proto/hostagent/v1/*.proto)
  fi
  say "building hostagent $version in $vdir"
  [ -e "$vdir" ] && remove_tree "$vdir"
  mkdir -p "$prefix/versions"
  "$py" -m venv "$vdir"
  "$vdir/bin/pip" install -q --disable-pip-version-check --no-warn-script-location "$stage"
  # bcc is pure Python over ctypes: link Debian's package into the virtualenv
  site=$("$vdir/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  ln -sfn /usr/lib/python3/dist-packages/bcc "$site/bcc"
  # where hostagent.bpf.loader looks for the C sources: <sys.prefix>/share/hostagent/bpf
  mkdir -p "$vdir/share/hostagent" "$vdir/libexec" "$vdir/share/doc/hostagent"
  cp -r "$stage/bpf" "$vdir/share/hostagent/bpf"
  install -m 0755 "$stage/extra/hostagent-wait-ready" "$vdir/libexec/"
  install -m 0644 "$stage/extra/deploy-vm.md" "$stage/README.md" "$vdir/share/doc/hostagent/"
  touch "$vdir/.complete"   # a build cut short is rebuilt, never used
fi
"$vdir/bin/python" -c 'import bcc' || die "bcc does not import in $vdir"
"$vdir/bin/hostagent" --version >/dev/null || die "$vdir/bin/hostagent does not run"

# ---------------------------------------------------------------------------------------------
# Config (written once, never overwritten), checked by the new version before it is used

mkdir -p "$etc"
chmod 0755 "$etc"
if [ ! -e "$etc/hostagent.yaml" ]; then
  install -m 0644 "$src/packaging/hostagent.yaml" "$etc/hostagent.yaml"
  say "wrote $etc/hostagent.yaml (the commented defaults: edit it, see docs/deploy-vm.md)"
fi
if [ ! -e "$etc/policies" ]; then
  mkdir -p "$etc/policies"
  install -m 0644 "$src/policies/default.yaml" "$etc/policies/default.yaml"
  say "wrote $etc/policies/default.yaml (an example that selects nothing yet)"
fi
if [ ! -e "$etc/hostagent.env" ]; then
  sed "s#/etc/hostagent#$etc#g" "$src/packaging/systemd/hostagent.env" > "$etc/hostagent.env"
  chmod 0644 "$etc/hostagent.env"
fi
if [ -d /run/systemd/resolve ] && grep -Eq '^[[:space:]]*listen: "?127\.0\.0\.53:53' \
     "$etc/hostagent.yaml"; then
  say "warning: systemd-resolved runs here and listens on 127.0.0.53:53: set dns.listen in" \
      "$etc/hostagent.yaml to another address (docs/deploy-vm.md)"
fi
"$vdir/bin/hostagent" policy check --config "$etc/hostagent.yaml" "$etc/policies" ||
  die "$etc/hostagent.yaml or $etc/policies is not accepted by hostagent $version: fix it" \
      "and run this again (nothing was switched)"

# ---------------------------------------------------------------------------------------------
# Switch: unit, then `current`, then (re)start

mkdir -p "$unit_dir"
sed -e "s#/opt/hostagent#$prefix#g" -e "s#/etc/hostagent#$etc#g" \
  "$src/packaging/systemd/hostagent.service" > "$unit.tmp"
mv "$unit.tmp" "$unit"
previous=$(readlink "$current" 2>/dev/null || true)
ln -sfn "versions/$name" "$prefix/current.tmp"
mv -T "$prefix/current.tmp" "$current"
mkdir -p "$bin_dir"
ln -sfn "$current/bin/hostagent" "$bin_dir/hostagent"
say "installed hostagent $version: $current -> versions/$name, $unit, $bin_dir/hostagent"

if manages_unit "enabling or starting"; then
  systemctl daemon-reload
  systemctl enable hostagent.service
  # restart: the old agent stops and leaves its programs pinned; the new one takes them over
  if ! systemctl restart hostagent.service; then
    if [ -n "$previous" ] && [ "$previous" != "versions/$name" ]; then
      say "hostagent $version did not become ready: going back to $previous"
      ln -sfn "$previous" "$prefix/current.tmp" && mv -T "$prefix/current.tmp" "$current"
      systemctl restart hostagent.service || true
    fi
    die "hostagent.service failed to start: journalctl -u hostagent"
  fi
  say "hostagent.service is enforcing ($("$current/bin/hostagent" --version))"
else
  say "start it by hand: $current/bin/hostagent run --config $etc/hostagent.yaml"
fi

# Keep the running version and the one before it (for going back); remove older builds.
keep_previous=${previous#versions/}
for d in "$prefix"/versions/*; do
  n=$(basename "$d")
  [ "$n" = "$name" ] || [ "$n" = "$keep_previous" ] || remove_tree "$d"
done
