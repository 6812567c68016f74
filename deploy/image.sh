#!/usr/bin/env bash
# Builds the Shoal container image into an OCI image layout, without a Docker daemon and
# without downloading a base image: the three release binaries (debug info stripped) plus
# exactly the shared libraries and dynamic loader `ldd` names for them, the host's CA
# bundle (origins reach upstream registries over HTTPS), and a minimal /etc.
#
#   deploy/image.sh OUT_DIR            # cargo build --release, then the image at OUT_DIR:<version>
#   skopeo copy oci:OUT_DIR:0.1.0 docker://registry.example/shoal:0.1.0
#
# Environment:
#   SHOAL_BIN_DIR    take the binaries from here instead of building them (the tests pass
#                    cargo's debug binaries: the image is the same shape, built in seconds)
#   SHOAL_IMAGE_TAG  tag in the layout (default: the binaries' version)
#   SOURCE_DATE_EPOCH  creation time recorded in the image (default: the last commit's)
#
# The entrypoint is /usr/local/bin/shoal-agent (the component every node runs); the
# others are /usr/local/bin/shoal-origin and /usr/local/bin/shoal-tracker (the Helm chart
# sets `command:` for each). Needs umoci (apt-get install umoci), ldd and strip (binutils).
set -euo pipefail

if [ $# -ne 1 ] || [ "${1:0:1}" = "-" ]; then
  sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
  exit 2
fi
out=$1
root=$(cd "$(dirname "$0")/.." && pwd)
bins=(shoal-agent shoal-origin shoal-tracker)

bin_dir=${SHOAL_BIN_DIR:-}
if [ -z "$bin_dir" ]; then
  (cd "$root" && cargo build --release --locked -p shoal-agent -p shoal-origin -p shoal-tracker)
  bin_dir=$root/target/release
fi
for b in "${bins[@]}"; do
  [ -x "$bin_dir/$b" ] || { echo "image.sh: $bin_dir/$b not found or not executable" >&2; exit 1; }
done
command -v umoci >/dev/null || { echo "image.sh: umoci not found (apt-get install umoci)" >&2; exit 1; }

version=$("$bin_dir/shoal-agent" --version | awk '{print $2}')
tag=${SHOAL_IMAGE_TAG:-$version}
revision=$(git -C "$root" rev-parse HEAD 2>/dev/null || echo unknown)
epoch=${SOURCE_DATE_EPOCH:-$(git -C "$root" log -1 --format=%ct 2>/dev/null || date +%s)}
created=$(date -u -d "@$epoch" +%Y-%m-%dT%H:%M:%SZ)
source_url=$(sed -n 's/^repository = "\(.*\)"/\1/p' "$root/Cargo.toml" | head -1)
license=$(sed -n 's/^license = "\(.*\)"/\1/p' "$root/Cargo.toml" | head -1)
case "$(uname -m)" in
  x86_64) arch=amd64 ;;
  aarch64) arch=arm64 ;;
  *) arch=$(uname -m) ;;
esac

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
rootfs=$stage/rootfs
mkdir -p "$rootfs/usr/local/bin" "$rootfs/etc/ssl/certs" "$rootfs/tmp" "$rootfs/var/lib/shoal"
chmod 1777 "$rootfs/tmp"

# The binaries, and every library (and the loader) they link, at the paths ldd names.
libs=()
for b in "${bins[@]}"; do
  cp "$bin_dir/$b" "$rootfs/usr/local/bin/$b"
  strip --strip-debug "$rootfs/usr/local/bin/$b"
  while read -r lib; do libs+=("$lib"); done < <(
    ldd "$bin_dir/$b" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }'
  )
done
if [ ${#libs[@]} -eq 0 ]; then
  echo "image.sh: ldd named no libraries (static binaries need none)" >&2
fi
for lib in $(printf '%s\n' "${libs[@]}" | sort -u); do
  mkdir -p "$rootfs$(dirname "$lib")"
  cp -L "$lib" "$rootfs$lib"
done

# TLS roots for upstream registries (rustls reads the system bundle).
if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
  cp -L /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
else
  echo "image.sh: warning: no /etc/ssl/certs/ca-certificates.crt; origins will trust only --upstream-ca" >&2
fi
printf 'root:x:0:0:root:/root:/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\n' \
  >"$rootfs/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' >"$rootfs/etc/group"
printf 'hosts: files dns\n' >"$rootfs/etc/nsswitch.conf"

# The image: an empty one, one layer with the tree, then its configuration.
if [ ! -f "$out/index.json" ]; then
  umoci init --layout "$out"
fi
umoci new --image "$out:$tag"
umoci insert --image "$out:$tag" --history.created "$created" \
  --history.created_by "deploy/image.sh (shoal $version)" "$rootfs" /
labels=(
  "org.opencontainers.image.title=shoal"
  "org.opencontainers.image.description=Shoal peer-to-peer container image distribution: shoal-agent, shoal-origin, shoal-tracker"
  "org.opencontainers.image.version=$version"
  "org.opencontainers.image.revision=$revision"
  "org.opencontainers.image.created=$created"
  "org.opencontainers.image.source=$source_url"
  "org.opencontainers.image.licenses=$license"
)
args=()
for l in "${labels[@]}"; do
  args+=(--config.label "$l" --manifest.annotation "$l")
done
umoci config --image "$out:$tag" --no-history --created "$created" --os linux --architecture "$arch" \
  --config.entrypoint /usr/local/bin/shoal-agent --config.cmd --help \
  --config.env PATH=/usr/local/bin:/usr/bin:/bin --config.workingdir / \
  --config.stopsignal SIGTERM "${args[@]}"
umoci gc --layout "$out"
echo "built oci:$out:$tag ($(du -sh "$out" | cut -f1))"
