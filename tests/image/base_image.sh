#!/usr/bin/env bash
# Make sure the base image a Dockerfile names exists locally: pull it, or, when no registry can be reached (as on
# CI here), build the same Debian release from the package archive with debootstrap and `docker import` it under
# that tag. Only Debian tags (debian:<suite>[-slim]) can be made this way.
#   usage: tests/image/base_image.sh debian:bookworm-slim
set -euo pipefail
tag=${1:?usage: base_image.sh debian:<suite>[-slim]}
docker=${DOCKER:-docker}

if "$docker" image inspect "$tag" >/dev/null 2>&1; then
    echo "base image $tag: present"
    exit 0
fi
if timeout 60 "$docker" pull -q "$tag" >/dev/null 2>&1; then
    echo "base image $tag: pulled"
    exit 0
fi
if [[ ! "$tag" =~ ^debian:([a-z]+)(-slim)?$ ]]; then
    echo "error: cannot pull $tag and only debian:<suite>[-slim] can be made locally; pull or build it yourself" >&2
    exit 1
fi
suite=${BASH_REMATCH[1]}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
if ! command -v debootstrap >/dev/null; then
    if [[ $(id -u) != 0 ]]; then
        echo "error: debootstrap is missing (apt-get install debootstrap, as root)" >&2
        exit 1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q debootstrap >/dev/null
fi
root=$(mktemp -d /tmp/base-image.XXXXXX)
trap 'rm -rf "$root"' EXIT
echo "base image $tag: not pullable; building it with debootstrap from $mirror (a few minutes)"
debootstrap --variant=minbase "$suite" "$root" "$mirror" >"$root.log" 2>&1 || {
    tail -20 "$root.log" >&2
    exit 1
}
rm -f "$root.log"
# What the official slim images also do: no apt caches or docs in the layer.
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/usr/share/doc/* "$root"/usr/share/man/*
tar -C "$root" -c . | "$docker" import --change 'CMD ["bash"]' - "$tag" >/dev/null
echo "base image $tag: made locally ($("$docker" image inspect -f '{{.Size}}' "$tag" | awk '{printf "%.0f MB", $1/1e6}'))"
