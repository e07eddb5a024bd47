#!/usr/bin/env bash
# Installs and builds what the tests and the lab need, caching everything (shared by tests/run
# and tests/lab):
#
#   tests/setup.sh
#
# On Debian 12 as root it installs what is missing: Debian packages, a virtualenv in .venv with
# this project and its test extras, kube-apiserver built from the Go module proxy, Debian's
# kernel and an initramfs for the IPVS VM, and the image (tests/image/build.sh). Downloads and
# builds are cached under ${IPVS_TEST_CACHE:-$HOME/.cache/ipvs-operator} (and pip's own cache):
# a warm run checks only.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
export IPVS_TEST_CACHE=${IPVS_TEST_CACHE:-$HOME/.cache/ipvs-operator}
export PATH=/usr/local/go/bin:$PATH

step() { printf '\n==> %s\n' "$*" >&2; }
t0=$SECONDS

# Debian packages: qemu and a busybox for the VM, kmod/cpio to build its initramfs, etcd for the
# API server, iproute2/nftables/ipvsadm used inside the VM (the VM runs the host's root read-only);
# bird2: the independent BGP router the directors peer with in the VM (tests/kernel/bgpbed.py);
# keepalived beside the agent in the health-check tests and benchmarks; the image: buildah and
# mmdebstrap build it, umoci unpacks it, runc runs its programs (host and VM), containerd, the CNI
# plugins and catatonit (the pause process) make the VM a node.
packages=(qemu-system-x86 busybox-static cpio kmod etcd-server iproute2 nftables ipvsadm bird2 keepalived
          procps python3-venv buildah mmdebstrap umoci runc containerd
          containernetworking-plugins catatonit iptables)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
    step "installing Debian packages: ${missing[*]}"
    if [[ $(id -u) != 0 ]]; then
        echo "tests/setup.sh: need root to install ${missing[*]} (run with sudo)" >&2
        exit 1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
command -v go >/dev/null || { echo "tests/setup.sh: Go >= 1.25 is required (/usr/local/go/bin/go)" >&2; exit 1; }

python=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
    step "creating .venv"
    "$python" -m venv .venv
fi
stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [[ ! -f $stamp ]]; then
    step "installing the project and its test dependencies into .venv"
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -e '.[test]'
    rm -f .venv/.installed-* && touch "$stamp"
fi

# The VM's kernel and the image are mostly downloads and unpacking, kube-apiserver's compile is
# CPU: cold, they overlap (about 2 of the 15 minutes). Each takes its own lock, and the image's
# SBOM tool waits for the Go build lock. The background job's progress is shown when it ends.
step "in the background: Debian kernel and initramfs for the IPVS VM; the image: base from" \
     "Debian's packages, Dockerfile, OCI archive, SBOM (cached)"
background_log=$(mktemp)
trap 'rm -f "$background_log"' EXIT
(
    .venv/bin/python -m tests.vm.image >/dev/null
    tests/image/build.sh >/dev/null
) 2>"$background_log" &
background=$!
step "kube-apiserver (cached build from the Go module proxy)"
apiserver=0
tests/apiserver/build.sh apiserver >/dev/null || apiserver=$?
# Waited for even when kube-apiserver failed: the job must not be cut short inside its caches.
step "waiting for the VM's kernel and the image"
status=0
wait "$background" || status=$?
cat "$background_log" >&2
((apiserver == 0)) || exit 1
((status == 0)) || { echo "tests/setup.sh: the VM's kernel or the image failed (above)" >&2; exit "$status"; }
printf "(tests/setup.sh took %ds)\n" $((SECONDS - t0)) >&2
