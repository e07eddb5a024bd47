#!/usr/bin/env bash
# Builds (once) the binaries the API-server test bed needs and prints their paths.
#
#   build.sh [apiserver]   kube-apiserver, plus a check that Debian's etcd is installed
#   build.sh helm          helm
#   build.sh syft          syft (the image's SBOM, tests/image/build.sh)
#   build.sh node          kube-controller-manager, kube-scheduler, kubelet, kubectl (tests/node)
#   build.sh all           kube-apiserver and helm
#
# kube-apiserver is built from the Go module proxy through the wrapper module in go/
# (k8s.io/kubernetes cannot be `go install`ed directly: see go/go.mod). Binaries carry the
# version in their name, so bumping the version in go/go.mod or HELM_VERSION below rebuilds,
# and a warm run only checks that the file exists. Everything (binaries, GOMODCACHE, GOCACHE)
# lives under one cache root so CI on a fresh clone can reuse it:
#   ${IPVS_TEST_CACHE:-$HOME/.cache/ipvs-operator}/{bin,gomod,gocache}
#
# Progress goes to stderr; stdout gets one line per requested binary, "name<TAB>path",
# which tests/apiserver/cluster.py reads.
set -euo pipefail

HELM_VERSION=v3.22.0
# The SBOM generator of the image (tests/image/build.sh): anchore's syft, from the Go module proxy.
SYFT_VERSION=v1.57.2
ETCD_MIN_VERSION=3.4

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache=${IPVS_TEST_CACHE:-$HOME/.cache/ipvs-operator}
bin=$cache/bin

log() { printf '[build.sh] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

find_go() {
    local go
    go=$(command -v go || true)
    [[ -z $go && -x /usr/local/go/bin/go ]] && go=/usr/local/go/bin/go
    [[ -n $go ]] || die "Go is not installed (need Go >= 1.25; see https://go.dev/doc/install)."
    printf '%s\n' "$go"
}

go_env() {
    export GOMODCACHE=$cache/gomod GOCACHE=$cache/gocache CGO_ENABLED=0
    mkdir -p "$bin" "$GOMODCACHE" "$GOCACHE"
}

# Serialise builds: two pytest sessions starting at once must not race on the same output.
lock() {
    mkdir -p "$cache"
    exec 9>"$cache/build.lock"
    flock 9
}

kubernetes_version() {
    local v
    v=$(awk '$1 == "k8s.io/kubernetes" && $2 ~ /^v1\./ { print $2 } \
             $1 == "require" && $2 == "k8s.io/kubernetes" { print $3 }' "$here/go/go.mod" | head -n1)
    [[ -n $v ]] || die "cannot find the k8s.io/kubernetes version in $here/go/go.mod"
    printf '%s\n' "$v"
}

# Every staging replace must point at v0.Y.Z for kubernetes v1.Y.Z; a half-done bump
# would otherwise build a confusing mix.
check_staging_versions() {
    local version=$1 staging=v0.${1#v1.} bad
    bad=$(awk -v want="$staging" '$2 == "=>" && $1 ~ /^k8s\.io\// && $4 != want { print $1 " " $4 }' \
        "$here/go/go.mod")
    [[ -z $bad ]] || die "go/go.mod: staging replaces must be $staging for $version, found: $bad"
}

# One binary of k8s.io/kubernetes/cmd (kube-apiserver, kubelet, ...) at go.mod's version.
build_kube() {
    local name=$1 version out start minor commit info
    version=$(kubernetes_version)
    out=$bin/$name-$version
    if [[ -x $out ]]; then
        log "$name $version: cached at $out"
        printf '%s\t%s\n' "$name" "$out"
        return
    fi
    lock
    if [[ -x $out ]]; then  # another process built it while we waited for the lock
        printf '%s\t%s\n' "$name" "$out"
        return
    fi
    check_staging_versions "$version"
    local go
    go=$(find_go)
    go_env
    minor=${version#v1.}
    minor=${minor%%.*}
    start=$SECONDS
    log "$name $version: downloading modules into $GOMODCACHE ..."
    (cd "$here/go" && "$go" mod download k8s.io/kubernetes)
    # The release's git commit, for /version; the proxy records it in the .info file.
    info=$GOMODCACHE/cache/download/k8s.io/kubernetes/@v/$version.info
    commit=$(grep -o '"Hash":"[0-9a-f]*"' "$info" 2>/dev/null | cut -d'"' -f4 || true)
    local pkg=k8s.io/component-base/version
    local ldflags="-s -w -X $pkg.gitVersion=$version -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
    ldflags+=" -X $pkg.gitTreeState=clean"
    [[ -n $commit ]] && ldflags+=" -X $pkg.gitCommit=$commit"
    # kubectl reports its version from client-go's copy of these variables.
    [[ $name == kubectl ]] && ldflags+=" ${ldflags//k8s.io\/component-base\/version/k8s.io/client-go/pkg/version}"
    log "$name $version: compiling with $("$go" version | cut -d' ' -f3)" \
        "(cold: ~5-10 minutes on 2 cores; cached afterwards) ..."
    (cd "$here/go" && "$go" build -trimpath -ldflags "$ldflags" -o "$out.tmp" \
        "k8s.io/kubernetes/cmd/$name") || { rm -f "$out.tmp"; die "go build failed"; }
    mv -f "$out.tmp" "$out"
    log "$name $version: built $out in $((SECONDS - start))s"
    printf '%s\t%s\n' "$name" "$out"
}

build_apiserver() { build_kube kube-apiserver; }

# The node test bed (tests/node): the control plane's other two and a node.
build_node() {
    local name
    for name in kube-controller-manager kube-scheduler kubelet kubectl; do
        build_kube "$name"
    done
}

check_etcd() {
    local etcd version
    etcd=$(command -v etcd || true)
    [[ -z $etcd && -x /usr/bin/etcd ]] && etcd=/usr/bin/etcd
    [[ -n $etcd ]] || die "etcd is not installed. Install Debian's etcd-server:" \
        "sudo apt-get install -y etcd-server (CI does this in .ci/run)."
    version=$("$etcd" --version 2>/dev/null | awk '/^etcd Version:/ { print $3 }')
    [[ -n $version ]] || die "cannot read the version of $etcd"
    if [[ $(printf '%s\n%s\n' "$ETCD_MIN_VERSION" "$version" | sort -V | head -n1) != "$ETCD_MIN_VERSION" ]]; then
        die "$etcd is $version; the test bed needs etcd >= $ETCD_MIN_VERSION"
    fi
    log "etcd $version: $etcd"
    printf 'etcd\t%s\n' "$etcd"
}

build_helm() {
    local out=$bin/helm-$HELM_VERSION start
    if [[ -x $out ]]; then
        log "helm $HELM_VERSION: cached at $out"
        printf 'helm\t%s\n' "$out"
        return
    fi
    lock
    if [[ -x $out ]]; then
        printf 'helm\t%s\n' "$out"
        return
    fi
    local go
    go=$(find_go)
    go_env
    start=$SECONDS
    local tmp dir info commit k8s_minor
    tmp=$(mktemp -d "$bin/.helm.XXXXXX")
    log "helm $HELM_VERSION: downloading the module ..."
    dir=$(cd "$tmp" && "$go" mod download -json "helm.sh/helm/v3@$HELM_VERSION" \
        | awk -F'"' '$2 == "Dir" { print $4 }') || true
    [[ -n $dir ]] || { rm -rf "$tmp"; die "cannot download helm.sh/helm/v3@$HELM_VERSION"; }
    info=$GOMODCACHE/cache/download/helm.sh/helm/v3/@v/$HELM_VERSION.info
    commit=$(grep -o '"Hash":"[0-9a-f]*"' "$info" 2>/dev/null | cut -d'"' -f4 || true)
    # Like helm's Makefile: the default .Capabilities.KubeVersion follows the client-go it
    # was built with (v0.Y.Z -> 1.Y); without it helm assumes Kubernetes 1.20.
    k8s_minor=$(awk '$1 == "k8s.io/client-go" { split($2, v, "."); print v[2] }' "$dir/go.mod")
    local v=helm.sh/helm/v3/internal/version
    local ldflags="-s -w -X $v.version=$HELM_VERSION -X $v.gitTreeState=clean"
    [[ -n $commit ]] && ldflags+=" -X $v.gitCommit=$commit"
    if [[ -n $k8s_minor ]]; then
        local p
        for p in helm.sh/helm/v3/pkg/chartutil helm.sh/helm/v3/pkg/lint/rules; do
            ldflags+=" -X $p.k8sVersionMajor=1 -X $p.k8sVersionMinor=$k8s_minor"
        done
    fi
    log "helm $HELM_VERSION: compiling (cold: a few minutes) ..."
    (cd "$tmp" && GOBIN=$tmp "$go" install -trimpath -ldflags "$ldflags" \
        "helm.sh/helm/v3/cmd/helm@$HELM_VERSION") || { rm -rf "$tmp"; die "go install failed"; }
    mv -f "$tmp/helm" "$out"
    rm -rf "$tmp"
    log "helm $HELM_VERSION: built $out in $((SECONDS - start))s"
    printf 'helm\t%s\n' "$out"
}

build_syft() {
    local out=$bin/syft-$SYFT_VERSION start
    if [[ -x $out ]]; then
        log "syft $SYFT_VERSION: cached at $out"
        printf 'syft\t%s\n' "$out"
        return
    fi
    lock
    if [[ -x $out ]]; then
        printf 'syft\t%s\n' "$out"
        return
    fi
    local go tmp
    go=$(find_go)
    go_env
    start=$SECONDS
    tmp=$(mktemp -d "$bin/.syft.XXXXXX")
    log "syft $SYFT_VERSION: downloading and compiling (cold: ~6 minutes on 2 cores) ..."
    (cd "$tmp" && GOBIN=$tmp "$go" install -trimpath -ldflags "-s -w -X main.version=$SYFT_VERSION" \
        "github.com/anchore/syft/cmd/syft@$SYFT_VERSION") || { rm -rf "$tmp"; die "go install failed"; }
    mv -f "$tmp/syft" "$out"
    rm -rf "$tmp"
    log "syft $SYFT_VERSION: built $out in $((SECONDS - start))s"
    printf 'syft\t%s\n' "$out"
}

case ${1:-apiserver} in
    apiserver) check_etcd; build_apiserver ;;
    helm) build_helm ;;
    syft) build_syft ;;
    node) build_node ;;
    all) check_etcd; build_apiserver; build_helm ;;
    -h|--help) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//' ;;
    *) die "unknown target '$1' (apiserver, helm, syft, node, all)" ;;
esac
