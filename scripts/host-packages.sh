#!/usr/bin/env bash
# The host half of setting hostagent up, shared by scripts/setup.sh (development and CI) and
# packaging/install.sh (VMs): Debian packages, and kernel headers bcc can compile against.
#
#   host-packages.sh install PACKAGE...   install what is missing of PACKAGE... (plus
#                                         linux-headers-<arch> when the kernel ships no
#                                         headers), then point bcc at those headers
#   host-packages.sh has-headers          exit 0 if bcc finds kernel headers for this kernel
#
# bcc compiles the agent's C at start. Kernels without packaged headers (this kind of VM) get
# Debian's linux-headers-<arch>: the programs use only uapi structs, which are stable across
# kernel versions, so older headers are fine. Each step checks first: a second run is cheap.
set -euo pipefail

say() { printf '%s: %s\n' "${HOST_PACKAGES_WHO:-host-packages}" "$*" >&2; }

kver=$(uname -r)
have_headers() {
  local m="/lib/modules/$kver"
  [ -e /sys/kernel/kheaders.tar.xz ] || [ -e "$m/build/include/uapi/linux/bpf.h" ] ||
    { [ -e "$m/build/Makefile" ] && [ -e "$m/source/include/uapi/linux/bpf.h" ]; }
}

case ${1:-} in
  has-headers) have_headers; exit ;;
  install) shift ;;
  *) say "usage: $0 install PACKAGE... | has-headers"; exit 2 ;;
esac

arch=$(dpkg --print-architecture)
want=("$@")
have_headers || want+=("linux-headers-$arch")
missing=()
for p in "${want[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Debian splits headers into an arch tree and a -common tree; bcc looks for exactly that pair
# as /lib/modules/<kernel>/build and .../source.
if ! have_headers; then
  hdr=$(find /usr/src -maxdepth 1 -name "linux-headers-*-$arch" | sort -V | tail -n 1)
  common=${hdr%-"$arch"}-common
  if [ -z "$hdr" ] || [ ! -d "$common" ]; then
    say "no kernel headers found for bcc under /usr/src (wanted linux-headers-$arch)"; exit 1
  fi
  mkdir -p "/lib/modules/$kver"
  ln -sfn "$hdr" "/lib/modules/$kver/build"
  ln -sfn "$common" "/lib/modules/$kver/source"
  say "bcc will use $hdr (+ $common) for kernel $kver"
fi
