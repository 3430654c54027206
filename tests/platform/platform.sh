#!/usr/bin/env bash
# platform.sh - build what moat's platform tests (tests/platform/test_*.py) need, on a build
# machine with no image registry: a container engine, systemd in a container, arm64 under qemu.
# The tests call it; it can be run by hand too (as root). It installs no packages: `check`
# names the Debian packages that are missing (tests/setup.sh installs them).
#
#   platform.sh check            exit 1 (and say which) if a program the platform tests need is missing
#   platform.sh env              print the `export` lines that make plain `podman ...` use our storage
#   platform.sh base             stand-in for docker.io/library/python:3.11-slim-bookworm (debootstrap
#                                minbase + `podman import`), so the unchanged `FROM` line resolves
#   platform.sh image [TAG]      build the repository's Dockerfile (default tag localhost/moat:test)
#   platform.sh systemd-image    build localhost/moat-systemd:test: systemd as PID 1, moat installed
#                                as README says (/opt/moat/venv), deploy/systemd/moat.service enabled
#   platform.sh prometheus-image TAG  a stand-in for the official Prometheus image (TAG, e.g.
#                                prom/prometheus:v2.53.0) around Debian's /usr/bin/prometheus
#   platform.sh arm64-rootfs     Debian bookworm arm64 rootfs (debootstrap --foreign + --second-stage
#                                under qemu-user in a private binfmt_misc, see userns_binfmt.py)
#   platform.sh arm64-venv       /opt/moat/venv in that rootfs: pip install the checkout (copied to
#                                /opt/moat/src), dependencies from PyPI, as on a Raspberry Pi
#   platform.sh arm64-run CMD... run CMD inside the arm64 rootfs (host network; /proc, /dev bound)
#   platform.sh clean [--all]    remove containers, images and podman storage (--all: also caches)
#
# Everything lives under $MOAT_PLATFORM_WORK (default /var/tmp/moat-platform): a podman storage
# of its own (never the machine's /var/lib/containers), the base rootfs tarball, the arm64 rootfs.
# Each step reuses what is there (FORCE=1 rebuilds the base). Builds hold a lock, so two test
# runs on one machine do not build at the same time. Nothing here listens on the network.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
W="${MOAT_PLATFORM_WORK:-/var/tmp/moat-platform}"
CS="$W/containers"
CACHE="$W/cache"
SUITE=bookworm
BASE_TAGS=(docker.io/library/python:3.11-slim-bookworm docker.io/library/python:3.11-slim)
BASE_TAR="$CACHE/python-3.11-slim-bookworm-standin.amd64.tar"
IMAGE_TAG="${MOAT_IMAGE:-localhost/moat:test}"
SD_TAG=localhost/moat-systemd:test
R="$W/rootfs-arm64"
ARM64_MARK="$R/.moat-rootfs-ok"
WRAP="$HERE/userns_binfmt.py"

export CONTAINERS_CONF="$CS/containers.conf"
export CONTAINERS_STORAGE_CONF="$CS/storage.conf"

exec 3>&2
log() { printf '[platform %(%H:%M:%S)T] %s\n' -1 "$*" >&3; }
die() { log "ERROR: $*"; exit 1; }
timed() {  # timed LABEL CMD...: run CMD, log its wall time
    local label=$1 t0=$EPOCHREALTIME rc=0
    shift
    "$@" || rc=$?
    log "$(awk -v a="$t0" -v b="$EPOCHREALTIME" -v l="$label" -v r=$rc \
        'BEGIN{printf "%-36s %7.1f s  rc=%d", l, b-a, r}')"
    return $rc
}
need_root() { [[ $(id -u) == 0 ]] || die "run as root"; }

mkdir -p "$W"
lock() {  # lock NAME: serialise builds between concurrent test runs (released at exit)
    exec 9>"$W/.lock-$1"
    flock -w 1800 9 || die "could not lock $W/.lock-$1 within 30 min"
}

cmd_check() {
    local missing=() c
    for c in podman runc debootstrap qemu-aarch64-static systemd-analyze dnsdist knotd knotc nsd \
             dig ip nsenter flock; do
        command -v "$c" >/dev/null 2>&1 || [[ -x /usr/sbin/$c ]] || missing+=("$c")
    done
    [[ -e /usr/libexec/qemu-binfmt/aarch64-binfmt-P ]] || missing+=(qemu-binfmt)
    if ((${#missing[@]})); then
        echo "missing: ${missing[*]} (Debian: podman buildah runc catatonit debootstrap" \
             "qemu-user-static systemd dnsdist knot knot-dnsutils nsd bind9-dnsutils iproute2" \
             "util-linux)"
        return 1
    fi
    echo "ok"
}

write_conf() {
    mkdir -p "$CS"
    local driver=${STORAGE_DRIVER:-}
    if [[ -z $driver ]]; then
        driver=vfs
        grep -qw overlay /proc/filesystems && driver=overlay
    fi
    cat > "$CS/storage.conf" <<EOF
[storage]
driver = "$driver"
runroot = "$CS/run"
graphroot = "$CS/storage"
EOF
    cat > "$CS/containers.conf" <<'EOF'
[containers]
# root on these machines lacks CAP_SYS_RESOURCE: podman's default nofile=1048576 cannot be set
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]
# the host's (or the caller's private) network namespace; no bridge, no NAT rules
netns = "host"
[engine]
# crun refuses this kernel's cgroup layout; Debian's runc accepts it
runtime = "runc"
EOF
    if [[ $driver == overlay ]] && ! podman info >/dev/null 2>&1; then
        log "overlay storage unusable here, falling back to vfs"
        STORAGE_DRIVER=vfs write_conf
    fi
}

cmd_env() {
    echo "export CONTAINERS_CONF=$CONTAINERS_CONF"
    echo "export CONTAINERS_STORAGE_CONF=$CONTAINERS_STORAGE_CONF"
}

mirror() {
    if [[ -n ${DEBIAN_MIRROR:-} ]]; then echo "$DEBIAN_MIRROR"; return; fi
    # the Debian mirror apt already uses (deb822 first, then sources.list)
    local m
    m=$(grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}' \
        | grep -E '/debian/?$' | head -1 || true)
    [[ -z $m ]] && m=$(grep -hs '^deb ' /etc/apt/sources.list | awk '{print $2}' \
        | grep -E '/debian/?$' | head -1 || true)
    echo "${m:-http://deb.debian.org/debian}"
}

copy_local_cas() {  # the build machine's extra CAs (TLS egress), so pip/apt inside reach PyPI
    local root=$1
    if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
        mkdir -p "$root/usr/local/share/ca-certificates"
        cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
        return 0
    fi
    return 1
}

# Shape a Debian rootfs like the official python:3.11-slim-bookworm where a Dockerfile notices:
# python/pip in /usr/local/bin, pip may install system-wide, docs and man pages excluded.
customize_rootfs() {
    local root=$1 m n
    rm -f "$root"/usr/lib/python3.*/EXTERNALLY-MANAGED
    for n in python python3; do ln -sfn /usr/bin/python3 "$root/usr/local/bin/$n"; done
    for n in pip pip3; do ln -sfn /usr/bin/pip3 "$root/usr/local/bin/$n"; done
    if copy_local_cas "$root"; then chroot "$root" update-ca-certificates >/dev/null 2>&1; fi
    cat > "$root/etc/dpkg/dpkg.cfg.d/docker-slim" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
EOF
    find "$root/usr/share/doc" -mindepth 2 ! -name copyright -type f -delete 2>/dev/null || true
    rm -rf "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/usr/share/locale/*
    m=$(mirror)
    rm -f "$root/etc/apt/sources.list"
    cat > "$root/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $m
Suites: $SUITE $SUITE-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: ${m%/debian}/debian-security
Suites: $SUITE-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/root/.cache
    rm -f "$root"/var/log/*.log
    : > "$root/etc/hostname"
}

ensure_base_tar() {
    if [[ ${FORCE:-0} != 1 && -s $BASE_TAR ]]; then return 0; fi
    mkdir -p "$CACHE"
    local root="$W/rootfs-amd64.tmp"
    rm -rf "$root"
    timed "debootstrap amd64 minbase" debootstrap --variant=minbase \
        --include=python3,python3-venv,python3-pip,ca-certificates \
        "$SUITE" "$root" "$(mirror)" > "$W/debootstrap-amd64.log" 2>&1 \
        || { tail -20 "$W/debootstrap-amd64.log" >&2; die "debootstrap failed"; }
    customize_rootfs "$root"
    timed "tar rootfs" tar -C "$root" --numeric-owner -cf "$BASE_TAR.tmp" .
    mv "$BASE_TAR.tmp" "$BASE_TAR"
    rm -rf "$root"
}

cmd_base() {
    need_root
    lock containers
    write_conf
    if [[ ${FORCE:-0} != 1 ]] && podman image exists "${BASE_TAGS[0]}"; then
        log "base image ${BASE_TAGS[0]} present"
        return 0
    fi
    ensure_base_tar
    timed "podman import (base)" podman import -q \
        --change 'ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' --change 'ENV PYTHON_VERSION=3.11' \
        --change 'CMD ["python3"]' "$BASE_TAR" "${BASE_TAGS[0]}" >/dev/null
    local t
    for t in "${BASE_TAGS[@]:1}"; do podman tag "${BASE_TAGS[0]}" "$t"; done
    log "base image ${BASE_TAGS[*]} ($(du -sh "$BASE_TAR" | cut -f1) tarball)"
}

cmd_image() {
    local tag=${1:-$IMAGE_TAG}
    cmd_base
    # --format docker keeps HEALTHCHECK (the OCI format drops it); --pull=never: no registry
    timed "podman build $tag" podman build -q --pull=never --format docker --network host \
        -t "$tag" -f "$REPO/Dockerfile" "$REPO" > "$W/build-image.log" 2>&1 \
        || { tail -30 "$W/build-image.log" >&2; die "podman build failed"; }
    log "image $tag: $(podman image inspect -f '{{.Size}}' "$tag" | awk '{printf "%.1f MB", $1/1e6}')"
    prune
}

prune() {  # images left untagged by rebuilds; a day's worth stays as build cache
    podman image prune -f --filter until=24h >/dev/null 2>&1 || true
}

# The source a user would have checked out: what `pip install .` needs (no tests, caches, .git).
copy_source() {
    local dest=$1
    rm -rf "$dest"
    mkdir -p "$dest"
    cp "$REPO/pyproject.toml" "$REPO/README.md" "$dest/"
    cp -r "$REPO/resolver" "$REPO/policy" "$dest/"
    find "$dest" -name __pycache__ -type d -prune -exec rm -rf {} +
}

cmd_systemd_image() {
    cmd_base
    local ctx="$W/systemd-ctx"
    rm -rf "$ctx"
    mkdir -p "$ctx"
    copy_source "$ctx/src"
    cp "$HERE/systemd/Dockerfile" "$HERE/systemd/moat-test-upstream.service" "$ctx/"
    cp "$REPO/deploy/systemd/moat.service" "$REPO/deploy/systemd/moat.toml" "$ctx/"
    timed "podman build (systemd image)" podman build -q --pull=never --format docker \
        --network host -t "$SD_TAG" "$ctx" > "$W/build-systemd.log" 2>&1 \
        || { tail -30 "$W/build-systemd.log" >&2; die "podman build (systemd) failed"; }
    rm -rf "$ctx"
    prune
}

cmd_prometheus_image() {
    local tag=${1:?tag}
    cmd_base
    [[ -x /usr/bin/prometheus ]] || die "/usr/bin/prometheus missing (Debian package prometheus)"
    podman image exists "$tag" && { log "$tag present"; return 0; }
    local ctx="$W/prometheus-ctx"
    rm -rf "$ctx"
    mkdir -p "$ctx"
    cp /usr/bin/prometheus "$ctx/prometheus"
    cat > "$ctx/Dockerfile" <<'EOF'
# stand-in for the official prom/prometheus image: same entrypoint, user, paths
FROM python:3.11-slim-bookworm
COPY prometheus /bin/prometheus
RUN mkdir -p /prometheus /etc/prometheus && chown nobody:nogroup /prometheus
USER nobody
WORKDIR /prometheus
EXPOSE 9090
ENTRYPOINT ["/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
EOF
    timed "podman build (prometheus stand-in)" podman build -q --pull=never --format docker \
        -t "$tag" "$ctx" > "$W/build-prometheus.log" 2>&1 \
        || { tail -30 "$W/build-prometheus.log" >&2; die "podman build (prometheus) failed"; }
    rm -rf "$ctx"
}

# --- arm64 (Raspberry Pi OS 64-bit is Debian bookworm arm64) -----------------------------------

CHROOT_ENV=(env -i PATH=/opt/moat/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
            HOME=/root LANG=C.UTF-8 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
            PIP_DEFAULT_TIMEOUT=120 PYTHONUNBUFFERED=1)

arm64_deps() {
    [[ -e /usr/libexec/qemu-binfmt/aarch64-binfmt-P ]] || die "qemu-user-static is not installed"
    command -v debootstrap >/dev/null || die "debootstrap is not installed"
    "$WRAP" true || die "no private binfmt_misc here (needs Linux >= 6.7, this is $(uname -r))"
}

# in_rootfs CMD...: CMD chrooted into the arm64 rootfs under emulation, in a private user, mount
# and PID namespace (CMD is PID 1 there), host network; /proc /dev /sys bound.
# With IN_ROOTFS_EXEC=1 the wrapper replaces this shell, so `$!` of a background call is it.
in_rootfs() {
    local run=("$WRAP")
    [[ -n ${IN_ROOTFS_EXEC:-} ]] && run=(exec "$WRAP")
    "${run[@]}" --pid sh -c "
        set -e
        mount -t proc proc '$R/proc' 2>/dev/null || mount --rbind /proc '$R/proc'
        mount --rbind /dev '$R/dev'; mount --rbind /sys '$R/sys'
        exec chroot '$R' \"\$@\"" sh "${CHROOT_ENV[@]}" "$@"
}

cmd_arm64_rootfs() {
    need_root
    lock arm64
    arm64_deps
    if [[ -f $ARM64_MARK ]]; then log "arm64 rootfs $R present"; return 0; fi
    rm -rf "$R"
    timed "debootstrap --foreign arm64" debootstrap --arch arm64 --foreign --variant=minbase \
        --include=python3,python3-venv,python3-pip,ca-certificates "$SUITE" "$R" "$(mirror)" \
        > "$W/debootstrap-arm64.log" 2>&1 \
        || { tail -20 "$W/debootstrap-arm64.log" >&2; die "debootstrap stage 1 failed"; }
    # container=lxc: debootstrap skips its mknod test; --net: no network needed (all downloaded)
    timed "debootstrap --second-stage (qemu)" "$WRAP" --pid --net env container=lxc \
        chroot "$R" /debootstrap/debootstrap --second-stage >> "$W/debootstrap-arm64.log" 2>&1 \
        || { tail -20 "$W/debootstrap-arm64.log" >&2; die "debootstrap stage 2 failed"; }
    if copy_local_cas "$R"; then
        timed "update-ca-certificates (qemu)" in_rootfs update-ca-certificates >/dev/null
    fi
    rm -rf "$R"/var/cache/apt/archives/*.deb
    touch "$ARM64_MARK"
    log "arm64 rootfs ready: $(du -sh "$R" | cut -f1)"
}

cmd_arm64_venv() {
    cmd_arm64_rootfs
    lock arm64
    # the checkout as a Pi user would have it; a stamp of its content decides whether to reinstall
    local stamp
    stamp=$(cd "$REPO" && find pyproject.toml resolver policy -name '*.py' -o -name '*.toml' \
            -o -name py.typed | sort | xargs sha256sum | sha256sum | cut -c1-16)
    if [[ -f $R/opt/moat/.installed && $(cat "$R/opt/moat/.installed") == "$stamp" ]]; then
        log "moat already installed in the arm64 rootfs ($stamp)"
        return 0
    fi
    copy_source "$R/opt/moat/src"
    [[ -x $R/opt/moat/venv/bin/python ]] || \
        timed "python3 -m venv (qemu)" in_rootfs /usr/bin/python3 -m venv /opt/moat/venv
    timed "pip install moat[fast] (qemu)" in_rootfs /opt/moat/venv/bin/pip install -q \
        '/opt/moat/src[fast]' > "$W/arm64-pip.log" 2>&1 \
        || { tail -30 "$W/arm64-pip.log" >&2; die "pip install in the arm64 rootfs failed"; }
    echo "$stamp" > "$R/opt/moat/.installed"
}

cmd_arm64_run() {
    [[ -f $ARM64_MARK ]] || die "no arm64 rootfs: run '$0 arm64-rootfs' first"
    in_rootfs "$@"
}

cmd_clean() {
    need_root
    if [[ -f $CS/storage.conf ]]; then
        podman rm -af -t 0 >/dev/null 2>&1 || true
        podman rmi -af >/dev/null 2>&1 || true
    fi
    awk -v p="$CS/" 'index($2, p) == 1 {print $2}' /proc/self/mounts | sort -r \
        | while read -r m; do umount "$m" || true; done
    rm -rf "$CS" "$W/systemd-ctx" "$W/rootfs-amd64.tmp" "$W"/*.log
    if [[ ${1:-} == --all ]]; then rm -rf "$CACHE" "$R"; fi
    log "cleaned $W"
}

case "${1:-}" in
    check) cmd_check ;;
    env) write_conf; cmd_env ;;
    base) cmd_base ;;
    image) shift; cmd_image "$@" ;;
    systemd-image) cmd_systemd_image ;;
    prometheus-image) shift; cmd_prometheus_image "$@" ;;
    arm64-rootfs) cmd_arm64_rootfs ;;
    arm64-venv) cmd_arm64_venv ;;
    arm64-run) shift; cmd_arm64_run "$@" ;;
    clean) shift; cmd_clean "$@" ;;
    *) sed -n '2,28p' "$0"; exit 2 ;;
esac
