#!/usr/bin/env bash
# Builds the image from the Dockerfile as users do, without a Docker daemon or a registry, and
# exports it with its SBOM:
#
#   tests/image/build.sh            base (cached), image, OCI archive, SBOM
#   tests/image/build.sh base       only the base image
#   tests/image/build.sh pause      the pod sandbox image of the node test bed (tests/node)
#
# 1. Base: the Dockerfile's `FROM debian:bookworm-<date>-slim@sha256:...` cannot be pulled here
#    (no registry). Debian builds that image from Debian packages (a minbase bootstrap with the
#    "slim" dpkg path exclusions), and so does this: mmdebstrap --variant=minbase from Debian's
#    archive, merged /usr without the usrmerge package, docs/man/locales excluded (kept out of
#    later installs too), apt configured as in the official image, PATH and CMD as its config.
#    It is stored as docker.io/library/debian:bookworm-slim and rebuilt when this recipe changes
#    or after BASE_MAX_AGE_DAYS, so its packages follow Debian's security updates.
# 2. Image: `buildah build` of the repository's Dockerfile with `--from` naming that base (the
#    only difference from `docker build .`), chroot isolation, vfs storage, layer cache.
# 3. Export, into $cache/artifacts/<inputs>/ (build/image links to it): ipvs-operator.oci.tar
#    (OCI archive, ref localhost/ipvs-operator:<appVersion>), sbom.spdx.json (SPDX 2.3 from
#    syft, tests/apiserver/build.sh syft) and image.json (image id, digest, timings). <inputs> is
#    a hash of the Dockerfile, the base image and every file the Dockerfile copies: the same
#    sources build once, in any checkout sharing the cache.
#
# Runs as root (buildah with chroot isolation, mmdebstrap in root mode). Needs the Debian
# packages buildah, mmdebstrap (tests/setup.sh installs them). Storage and the base live under
# ${IPVS_TEST_CACHE:-$HOME/.cache/ipvs-operator}/image, locked against concurrent builds.
# Progress goes to stderr; the last stdout line is the path of image.json.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cache=${IPVS_TEST_CACHE:-$HOME/.cache/ipvs-operator}/image
KEEP_ARTIFACTS=3
NAME=localhost/ipvs-operator
TAG=$(awk -F'"' '/^appVersion:/ { print $2 }' "$root/charts/ipvs-operator/Chart.yaml")
BASE=docker.io/library/debian:bookworm-slim
BASE_MAX_AGE_DAYS=7
SUITE=bookworm
MIRRORS=(
    "deb http://deb.debian.org/debian $SUITE main"
    "deb http://deb.debian.org/debian $SUITE-updates main"
    "deb http://deb.debian.org/debian-security $SUITE-security main"
)
# The slim image's dpkg exclusions: no documentation but the copyright files, no manuals,
# translations, info pages. They stay in /etc/dpkg/dpkg.cfg.d, so later installs keep them.
SLIM=(
    'path-exclude=/usr/share/doc/*'
    'path-include=/usr/share/doc/*/copyright'
    'path-exclude=/usr/share/man/*'
    'path-exclude=/usr/share/groff/*'
    'path-exclude=/usr/share/info/*'
    'path-exclude=/usr/share/lintian/*'
    'path-exclude=/usr/share/linda/*'
    'path-exclude=/usr/share/locale/*'
)
# apt as the official image configures it: no package cache, no translations, gzipped lists,
# suggestions never kept by autoremove.
APT_CONF='
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Acquire::Languages "none";
Acquire::GzipIndexes "true";
Acquire::CompressionTypes::Order:: "gz";
Apt::AutoRemove::SuggestsImportant "false";
'

log() { printf '[image] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[[ $(id -u) == 0 ]] || die "run as root (buildah chroot isolation, mmdebstrap root mode)"
for tool in buildah mmdebstrap; do
    command -v "$tool" >/dev/null || die "$tool is not installed (tests/setup.sh installs it)"
done
mkdir -p "$cache"
exec 8>"$cache/lock"
flock 8

# Storage of our own (vfs: no overlay mounts needed; chroot isolation: no runtime needed).
buildah_() {
    buildah --root "$cache/storage" --runroot "$cache/run" --storage-driver vfs "$@"
}

recipe_key() {
    { declare -p SUITE MIRRORS SLIM APT_CONF; declare -f build_base; } | sha256sum | cut -c1-16
}

build_base() {
    local key=$1 tmp start=$SECONDS ctr epoch
    tmp=$(mktemp -d "$cache/base.XXXXXX")
    # Files dated at the start of today (UTC): the same recipe on the same day gives the same tree.
    epoch=$(( $(date -u +%s) / 86400 * 86400 ))
    local args=(--variant=minbase --mode=root --format=tar --skip=output/dev
                --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr
                --customize-hook='rm -f "$1"/etc/hostname "$1"/etc/resolv.conf'
                --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin "$1"/var/log/apt/* "$1"/var/log/dpkg.log'
                --customize-hook="printf '%s' '$APT_CONF' > \"\$1\"/etc/apt/apt.conf.d/docker-slim")
    local opt
    for opt in "${SLIM[@]}"; do args+=(--dpkgopt="$opt"); done
    log "base: mmdebstrap $SUITE minbase from Debian's archive (cold: ~2 min) ..."
    SOURCE_DATE_EPOCH=$epoch mmdebstrap "${args[@]}" "$SUITE" "$tmp/rootfs.tar" "${MIRRORS[@]}" \
        2>"$tmp/mmdebstrap.log" || { tail -20 "$tmp/mmdebstrap.log" >&2; rm -rf "$tmp"; die "mmdebstrap failed"; }
    ctr=$(buildah_ from scratch)
    buildah_ add "$ctr" "$tmp/rootfs.tar" / >/dev/null
    buildah_ config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        --cmd '["bash"]' --label "io.ipvs-operator.base-recipe=$key" \
        --label "io.ipvs-operator.base-built=$(date -u +%F)" "$ctr"
    buildah_ commit --quiet --rm --timestamp "$epoch" "$ctr" "$BASE" >/dev/null
    rm -rf "$tmp"
    log "base: $BASE built in $((SECONDS - start))s"
}

base() {
    local key label built age
    key=$(recipe_key)
    label=$(buildah_ inspect --type image --format '{{index .OCIv1.Config.Labels "io.ipvs-operator.base-recipe"}} {{index .OCIv1.Config.Labels "io.ipvs-operator.base-built"}}' "$BASE" 2>/dev/null || true)
    built=${label#* }
    if [[ ${label%% *} == "$key" && -n $built ]]; then
        age=$(( ($(date -u +%s) - $(date -u -d "$built" +%s)) / 86400 ))
        if (( age < BASE_MAX_AGE_DAYS )); then
            log "base: $BASE cached (recipe $key, built $built)"
            return
        fi
        log "base: $BASE is $age days old: rebuilding for Debian's updates"
    fi
    build_base "$key"
}

# This machine may reach PyPI through a proxy whose CA only its own bundle trusts (pip's
# `cert` setting). The build's RUN steps then get a read-only /root holding a pip.conf that
# names that bundle: mounted over a folder the base already has, so no mount point is left in
# any layer, and never copied (only the build stage runs pip; tests/image checks the image).
build_mounts() {
    local ca=${PIP_CERT:-}
    [[ -z $ca ]] && ca=$(python3 -m pip config get global.cert 2>/dev/null || true)
    if [[ -n $ca && -f $ca ]]; then
        mkdir -p "$cache/build-root/.config/pip"
        cp -f "$ca" "$cache/build-root/.config/pip/ca.crt"
        printf '[global]\ncert = /root/.config/pip/ca.crt\n' >"$cache/build-root/.config/pip/pip.conf"
        printf '%s\n' --volume "$cache/build-root:/root:ro"
    fi
}

# What the build reads: the Dockerfile, the base image, and every file its COPY lines take
# from the context (as git would list them, plus uncommitted changes). Equal inputs, equal image:
# a warm run skips buildah (whose cache check alone copies every layer under vfs).
inputs_key() {
    local sources
    sources=$(awk '/^COPY / && !/--from/ { for (i = 2; i < NF; i++) print $i }' "$root/Dockerfile")
    {
        buildah_ inspect --type image --format '{{.FromImageID}}' "$BASE"
        cat "$root/Dockerfile"
        # shellcheck disable=SC2086
        (cd "$root" && find $sources -type f ! -path '*/__pycache__/*' ! -name '*.pyc' -print0 \
            | sort -z | xargs -0 sha256sum)
    } | sha256sum | cut -c1-16
}

image() {
    local start=$SECONDS id digest mounts key out archive
    key=$(inputs_key)
    out=$cache/artifacts/$key
    archive=$out/ipvs-operator.oci.tar
    mkdir -p "$root/build" && ln -sfn "$out" "$root/build/image"
    if [[ -f $out/image.json ]]; then
        log "image: inputs unchanged ($key): $out"
        printf '%s\n' "$out/image.json"
        return
    fi
    mkdir -p "$out"
    mapfile -t mounts < <(build_mounts)
    log "image: buildah build of the Dockerfile --from $BASE ${mounts[*]} ..."
    buildah_ rm --all >/dev/null 2>&1 || true  # working containers of an interrupted build
    buildah_ build --quiet --isolation chroot --layers --pull=never --from "$BASE" "${mounts[@]}" \
        --tag "$NAME:$TAG" --file "$root/Dockerfile" "$root" >/dev/null \
        || die "buildah build failed"
    local build_seconds=$((SECONDS - start))
    id=$(buildah_ inspect --type image --format '{{.FromImageID}}' "$NAME:$TAG")
    rm -f "$archive" "$out/sbom.spdx.json" "$out/image.json"
    start=$SECONDS
    buildah_ push --quiet "$NAME:$TAG" "oci-archive:$archive.tmp:$NAME:$TAG" >/dev/null
    mv -f "$archive.tmp" "$archive"
    local push_seconds=$((SECONDS - start))
    start=$SECONDS
    local syft
    syft=$("$root/tests/apiserver/build.sh" syft | cut -f2)
    SYFT_CHECK_FOR_APP_UPDATE=false "$syft" scan --quiet "oci-archive:$archive" \
        --output "spdx-json=$out/sbom.spdx.json" || die "syft failed"
    local sbom_seconds=$((SECONDS - start))
    digest=$(buildah_ inspect --type image --format '{{.FromImageDigest}}' "$NAME:$TAG")
    cat >"$out/image.json" <<EOF
{"name": "$NAME:$TAG", "id": "$id", "digest": "$digest", "base": "$BASE", "inputs": "$key",
 "archive": "$archive", "sbom": "$out/sbom.spdx.json",
 "seconds": {"build": $build_seconds, "export": $push_seconds, "sbom": $sbom_seconds}}
EOF
    log "image: $NAME:$TAG built (${build_seconds}s), exported (${push_seconds}s), SBOM (${sbom_seconds}s)"
    # Keep the last few: other checkouts sharing the cache may build other sources.
    # shellcheck disable=SC2012
    ls -1dt "$cache"/artifacts/*/ | tail -n +$((KEEP_ARTIFACTS + 1)) | xargs -r rm -rf
    # Bound the layer cache: vfs keeps a full copy of every layer.
    if (( $(du -sm "$cache/storage" | cut -f1) > 8192 )); then
        log "image: layer cache above 8 GiB: pruning unused images"
        buildah_ rmi --prune >/dev/null || true
    fi
    printf '%s\n' "$out/image.json"
}

# The pod sandbox ("pause") image for the node test bed's containerd: no registry here to pull
# registry.k8s.io/pause from, so Debian's catatonit in pause mode (podman's own pause process),
# static, alone in an image. Prints the archive's path.
pause() {
    local key out ctr
    command -v catatonit >/dev/null || die "catatonit is not installed (tests/setup.sh installs it)"
    key=$(sha256sum "$(command -v catatonit)" | cut -c1-16)
    out=$cache/artifacts/pause-$key.oci.tar
    if [[ ! -f $out ]]; then
        ctr=$(buildah_ from scratch)
        buildah_ copy "$ctr" "$(command -v catatonit)" /catatonit >/dev/null
        buildah_ config --entrypoint '["/catatonit", "-P"]' --user 65535:65535 "$ctr"
        buildah_ commit --quiet --rm "$ctr" localhost/pause:catatonit >/dev/null
        buildah_ push --quiet localhost/pause:catatonit "oci-archive:$out.tmp:localhost/pause:catatonit"
        mv -f "$out.tmp" "$out"
        log "pause: localhost/pause:catatonit exported to $out"
    fi
    printf '%s\n' "$out"
}

case ${1:-all} in
    base) base ;;
    pause) pause ;;
    all) base; image ;;
    -h|--help) sed -n '2,26p' "$0" | sed 's/^# \{0,1\}//' ;;
    *) die "unknown target '$1' (all, base, pause)" ;;
esac
