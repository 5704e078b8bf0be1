#!/usr/bin/env bash
# Builds a stand-in for python:3.11-slim on a machine that reaches no container registry: Debian
# bookworm (minbase, whose python3 is 3.11) with python3-venv, imported into podman as
# localhost/tts-gateway-base:bookworm. It carries this host's CA certificates and pip configuration, so
# a pip inside the image build gets through an HTTPS proxy only the host trusts and finds the wheel
# directories the host's pip is told about; the Dockerfile stays the one a user builds.
#
# Prints the flags `make image` needs (IMAGE_BUILD_FLAGS): the base image as a build argument and the
# host's local pip wheel directories mounted read-only into the build. Idempotent: an existing base is
# reused (FORCE=1 rebuilds it). Needs root, debootstrap and podman. A user with a registry never runs this.
set -euo pipefail

BASE_NAME=${BASE_NAME:-localhost/tts-gateway-base:bookworm}
MIRROR=${MIRROR:-http://deb.debian.org/debian}

# Local directories named by the host's pip configuration (find-links, file:// indexes), existing ones.
pip_dirs() {
    { pip3 config list 2>/dev/null || true; env | grep '^PIP_' || true; } \
        | grep -oE "(file://)?/[^' \"]+" | sed 's|^file://||' \
        | while read -r path; do
            # an index URL names .../simple; mount the directory it lives in
            [ -d "$path" ] && echo "$path"
        done | sort -u
}

if [ "${FORCE:-0}" = 1 ] || ! podman image exists "$BASE_NAME"; then
    [ "$(id -u)" = 0 ] || { echo "container-base.sh: needs root (debootstrap)" >&2; exit 1; }
    root=$(mktemp -d /var/tmp/tts-gateway-base.XXXXXX)
    trap 'rm -rf "$root"' EXIT
    echo "building $BASE_NAME with debootstrap (a few minutes)" >&2
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        bookworm "$root" "$MIRROR" >&2
    # The host's trust store (it includes any proxy CA the host was given) and its pip configuration.
    cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
    if [ -d /usr/local/share/ca-certificates ]; then
        cp -r /usr/local/share/ca-certificates/. "$root/usr/local/share/ca-certificates/"
    fi
    [ -f /etc/pip.conf ] && cp /etc/pip.conf "$root/etc/pip.conf"
    if [ -d /etc/xdg/pip ]; then
        mkdir -p "$root/etc/xdg" && cp -r /etc/xdg/pip "$root/etc/xdg/pip"
    fi
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
    changes=(--change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]')
    while IFS='=' read -r key value; do
        changes+=(--change "ENV $key=$value")
    done < <(env | grep '^PIP_' || true)
    tar -C "$root" -c . | podman import "${changes[@]}" - "$BASE_NAME" >&2
fi

flags="--build-arg BASE_IMAGE=$BASE_NAME"
for dir in $(pip_dirs); do
    flags="$flags --volume $dir:$dir:ro"
done
echo "$flags"
