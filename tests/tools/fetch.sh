#!/usr/bin/env bash
# Fetch the deploy/monitoring test tools into one folder, from Debian's archive (no system install):
#   kubectl (embeds kustomize), prometheus and promtool from Debian trixie, unpacked with `dpkg -x`.
# They are Go binaries that need only libc >= 2.34, so they run on bookworm. Once the folder exists, nothing is
# fetched again (the tests run offline). Usage: tests/tools/fetch.sh DIR
set -euo pipefail
dest=${1:?usage: fetch.sh DIR}
suite=${MX_TOOLS_SUITE:-trixie}
mirror=${MX_TOOLS_MIRROR:-http://deb.debian.org/debian}
pkgs=(kubectl prometheus promtool)
mkdir -p "$dest"
dest=$(cd "$dest" && pwd)
apt_dir="$dest/apt"
mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial" "$dest/debs" "$dest/root" "$dest/bin"
echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror $suite main" >"$apt_dir/sources.list"
opts=(-q -o "Dir::Etc::SourceList=$apt_dir/sources.list" -o Dir::Etc::SourceParts=/dev/null
      -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache=$apt_dir/cache" -o Debug::NoLocking=1
      -o APT::Sandbox::User=root -o Dir::State::status=/dev/null)
apt-get "${opts[@]}" update >/dev/null
(cd "$dest/debs" && apt-get "${opts[@]}" download "${pkgs[@]}" >/dev/null)
for deb in "$dest"/debs/*.deb; do
    dpkg -x "$deb" "$dest/root"
done
ln -sf ../root/usr/bin/kubectl ../root/usr/bin/prometheus ../root/usr/bin/promtool "$dest/bin/"
rm -rf "$apt_dir" "$dest/debs"
"$dest/bin/kubectl" version --client
"$dest/bin/prometheus" --version 2>&1 | head -1
"$dest/bin/promtool" --version 2>&1 | head -1
