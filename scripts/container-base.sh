#!/usr/bin/env bash
# Local base images for building and running fedmq's containers without a registry.
#
#   scripts/container-base.sh setup   # root on Debian: podman + runc (apt), podman-compose (venv)
#   scripts/container-base.sh base    # build the two base images below unless they already exist
#   scripts/container-base.sh remove  # delete them
#
# Images (podman storage, outside any checkout; kept between runs as a cache):
#   localhost/fedmq-base/python:bookworm    Debian bookworm minbase (debootstrap, signatures checked
#                                           against debian-archive-keyring) + Python 3.11 in a venv
#                                           on PATH: a drop-in for python:3.11-slim-bookworm
#   localhost/fedmq-base/rabbitmq:bookworm  the same + Debian's rabbitmq-server (3.10) with the
#                                           management plugin; RABBITMQ_DEFAULT_USER/PASS honoured
#
# Environment: FEDMQ_DEBIAN_MIRROR (default: the first deb.debian.org-style URI apt uses here),
# FEDMQ_BASE_REBUILD=1 to rebuild even when the images exist.
set -euo pipefail

PYTHON_IMAGE=localhost/fedmq-base/python:bookworm
RABBITMQ_IMAGE=localhost/fedmq-base/rabbitmq:bookworm
SUITE=bookworm
#: podman-compose lives in a venv of its own, outside any checkout (setup prints nothing else)
COMPOSE_VENV=${FEDMQ_COMPOSE_VENV:-/var/cache/fedmq-containers/podman-compose}
PODMAN_COMPOSE_VERSION=1.6.0

log() { printf 'container-base: %s\n' "$*" >&2; }

mirror() {
    if [[ -n "${FEDMQ_DEBIAN_MIRROR:-}" ]]; then echo "$FEDMQ_DEBIAN_MIRROR"; return; fi
    local uri
    uri=$(grep -hoE '^(URIs:|deb) +https?://[^ ]+/debian/?( |$)' /etc/apt/sources.list \
          /etc/apt/sources.list.d/* 2>/dev/null | head -1 | awk '{print $2}' || true)
    echo "${uri:-http://deb.debian.org/debian}"
}

setup() {
    if ! command -v podman >/dev/null; then
        [[ $(id -u) == 0 && -f /etc/debian_version ]] || { log "podman missing and not root on Debian"; exit 1; }
        log "installing podman"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q podman runc fuse-overlayfs slirp4netns uidmap debootstrap >&2
    fi
    command -v debootstrap >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q debootstrap >&2
    if [[ ! -x $COMPOSE_VENV/bin/podman-compose ]]; then
        log "installing podman-compose into $COMPOSE_VENV"
        python3 -m venv "$COMPOSE_VENV"
        "$COMPOSE_VENV/bin/python" -m pip install -q "podman-compose==$PODMAN_COMPOSE_VERSION" >&2
    fi
    local conf=/etc/containers/containers.conf
    if [[ $(id -u) == 0 && ! -f $conf ]]; then
        # crun fails here on setrlimit(RLIMIT_NOFILE) and on hybrid cgroups: runc works
        log "writing $conf (runc, ulimits)"
        cat >"$conf" <<'CONF'
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]

[engine]
runtime = "runc"
CONF
    fi
}

build_python() {
    local root
    root=$(mktemp -d /var/tmp/fedmq-rootfs.XXXXXX)
    log "debootstrap $SUITE from $(mirror)"
    debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates,passwd \
        "$SUITE" "$root" "$(mirror)" >&2
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
    local raw=localhost/fedmq-base/rootfs:$SUITE
    tar -C "$root" -c . | podman import --quiet - "$raw" >/dev/null
    rm -rf "$root"
    local ctx
    ctx=$(mktemp -d)
    cat >"$ctx/Containerfile" <<CF
FROM $raw
# Debian's pip refuses system-wide installs (PEP 668): a venv on PATH, as python:3.11-slim has pip
RUN python3 -m venv /opt/venv && ln -s /opt/venv/bin/python /usr/local/bin/python
ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8
LABEL org.fedmq.cache=base
CMD ["python3"]
CF
    podman build --quiet --format docker -t "$PYTHON_IMAGE" "$ctx" >/dev/null
    podman rmi "$raw" >/dev/null
    rm -rf "$ctx"
}

build_rabbitmq() {
    local ctx
    ctx=$(mktemp -d)
    cat >"$ctx/entrypoint.sh" <<'SH'
#!/bin/sh
# The official image's RABBITMQ_DEFAULT_USER/PASS, as a config file the server reads at boot.
set -e
conf=/var/lib/rabbitmq/rabbitmq.conf
{
    echo "default_user = ${RABBITMQ_DEFAULT_USER:-guest}"
    echo "default_pass = ${RABBITMQ_DEFAULT_PASS:-guest}"
    echo "loopback_users = none"
    echo "listeners.tcp.default = 5672"
} >"$conf"
export RABBITMQ_CONFIG_FILE=$conf RABBITMQ_ENABLED_PLUGINS_FILE=/var/lib/rabbitmq/enabled_plugins
echo "[rabbitmq_management]." >"$RABBITMQ_ENABLED_PLUGINS_FILE"
exec /usr/lib/rabbitmq/bin/rabbitmq-server "$@"
SH
    cat >"$ctx/Containerfile" <<CF
FROM $PYTHON_IMAGE
RUN apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        rabbitmq-server && rm -rf /var/lib/apt/lists/* && chown -R rabbitmq:rabbitmq /var/lib/rabbitmq
COPY --chmod=755 entrypoint.sh /usr/local/bin/rabbitmq-entrypoint
ENV HOME=/var/lib/rabbitmq RABBITMQ_LOGS=- RABBITMQ_MNESIA_BASE=/var/lib/rabbitmq/mnesia
USER rabbitmq
EXPOSE 5672 15672
LABEL org.fedmq.cache=base
ENTRYPOINT ["/usr/local/bin/rabbitmq-entrypoint"]
CF
    podman build --quiet --format docker -t "$RABBITMQ_IMAGE" "$ctx" >/dev/null
    rm -rf "$ctx"
}

base() {
    local rebuild=${FEDMQ_BASE_REBUILD:-0}
    if [[ $rebuild == 1 ]] || ! podman image exists "$PYTHON_IMAGE"; then build_python; fi
    if [[ $rebuild == 1 ]] || ! podman image exists "$RABBITMQ_IMAGE"; then build_rabbitmq; fi
    echo "$PYTHON_IMAGE"
    echo "$RABBITMQ_IMAGE"
}

case "${1:-}" in
    setup) setup ;;
    base) base ;;
    remove) podman rmi --ignore "$RABBITMQ_IMAGE" "$PYTHON_IMAGE" >/dev/null ;;
    *) echo "usage: $0 setup|base|remove" >&2; exit 2 ;;
esac
