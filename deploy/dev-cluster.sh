#!/usr/bin/env bash
# Starts a local Shoal cluster (tracker, origin, two agents) on 127.0.0.1, pushes a small
# demo image and pulls it back through both agents. The tracker serves HTTPS with mutual TLS
# (a tracker certificate; agents call it with theirs), as a production cluster should.
#
#   deploy/dev-cluster.sh            build, start, push, verify; leave the cluster running
#   deploy/dev-cluster.sh --check    same, then stop everything (self-test; exit status tells)
#   deploy/dev-cluster.sh stop       stop the cluster recorded in $SHOAL_DEV_DIR
#
# Environment (defaults in brackets):
#   SHOAL_DEV_DIR [/tmp/shoal-dev]  all data, certificates, logs and the PID file (wiped on start)
#   SHOAL_DEV_NO_BUILD [unset]      set to 1 to skip `cargo build --release --workspace`
#   SHOAL_DEV_ORIGINS [1]           origins; more than 1 forms a ring (two owners per blob):
#                                   origin N listens on ORIGIN_PORT+2N, its peer on +2N+1
#   SHOAL_DEV_TRACKER_PORT [5100]
#   SHOAL_DEV_ORIGIN_PORT [5000]    SHOAL_DEV_ORIGIN_PEER_PORT [5001]
#   SHOAL_DEV_ORIGIN_INTERNAL_PORT [5020]  origin N's internal listener (mutual TLS) on +N:
#                                   the tracker and the ring call origins there
#   SHOAL_DEV_AGENT1_PORT [5050]    SHOAL_DEV_AGENT1_PEER_PORT [5051]
#   SHOAL_DEV_AGENT2_PORT [5060]    SHOAL_DEV_AGENT2_PEER_PORT [5061]
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="${SHOAL_DEV_DIR:-/tmp/shoal-dev}"
HOST=127.0.0.1
TRACKER_PORT="${SHOAL_DEV_TRACKER_PORT:-5100}"
ORIGIN_PORT="${SHOAL_DEV_ORIGIN_PORT:-5000}"
ORIGIN_PEER_PORT="${SHOAL_DEV_ORIGIN_PEER_PORT:-5001}"
ORIGIN_INTERNAL_PORT="${SHOAL_DEV_ORIGIN_INTERNAL_PORT:-5020}"
AGENT1_PORT="${SHOAL_DEV_AGENT1_PORT:-5050}"
AGENT1_PEER_PORT="${SHOAL_DEV_AGENT1_PEER_PORT:-5051}"
AGENT2_PORT="${SHOAL_DEV_AGENT2_PORT:-5060}"
AGENT2_PEER_PORT="${SHOAL_DEV_AGENT2_PEER_PORT:-5061}"
ORIGINS="${SHOAL_DEV_ORIGINS:-1}"
BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release"
PIDS="$DIR/pids"
IMAGE=demo/hello
TAG=v1
MANIFEST_ACCEPT="application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json"

log() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

usage() {
    sed -n '2,17p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

# Refuse to wipe anything that does not look like a dedicated directory.
check_dir() {
    case "$DIR" in
        "" | / | /tmp | /tmp/ | "$HOME" | "$HOME/" | "$ROOT" | "$ROOT/") die "refusing to use SHOAL_DEV_DIR=$DIR" ;;
    esac
}

# True if PID is alive and is one of our binaries (a recycled PID is left alone).
is_ours() {
    local pid=$1
    local comm
    comm="$(cat "/proc/$pid/comm" 2>/dev/null)" || return 1
    [[ "$comm" == shoal-* ]] || return 1
    # A zombie (our own child, killed but not reaped yet) counts as gone.
    [[ "$(awk '{ print $3 }' "/proc/$pid/stat" 2>/dev/null)" != Z ]]
}

stop_cluster() {
    [[ -f "$PIDS" ]] || { log "no cluster recorded in $DIR"; return 0; }
    local name pid alive=()
    while read -r name pid; do
        if is_ours "$pid"; then
            kill -TERM "$pid" 2>/dev/null || true
            alive+=("$pid")
        fi
    done <"$PIDS"
    # Give them 5 s to shut down cleanly, then SIGKILL what is left.
    for _ in $(seq 50); do
        local left=()
        for pid in "${alive[@]+"${alive[@]}"}"; do
            if is_ours "$pid"; then left+=("$pid"); fi
        done
        alive=("${left[@]+"${left[@]}"}")
        [[ ${#alive[@]} -eq 0 ]] && break
        sleep 0.1
    done
    for pid in "${alive[@]+"${alive[@]}"}"; do
        kill -KILL "$pid" 2>/dev/null || true
    done
    rm -f "$PIDS"
    log "stopped the cluster in $DIR"
}

print_tails() {
    local f
    for f in "$DIR"/logs/*.log; do
        [[ -f "$f" ]] || continue
        printf -- '---- last 20 lines of %s ----\n' "$f" >&2
        tail -n 20 "$f" >&2 || true
    done
}

# start NAME BINARY ARGS...: runs a server in the background, logging to $DIR/logs/NAME.log.
start() {
    local name=$1 bin=$2
    shift 2
    NO_COLOR=1 SHOAL_LOG="${SHOAL_LOG:-info}" nohup "$BIN/$bin" "$@" </dev/null >"$DIR/logs/$name.log" 2>&1 &
    echo "$name $!" >>"$PIDS"
}

pid_of() { awk -v n="$1" '$1 == n { print $2 }' "$PIDS"; }

# wait_http NAME URL [CURL ARGS...]: waits up to 30 s for URL to answer 2xx while NAME is alive.
wait_http() {
    local name=$1 url=$2 pid
    shift 2
    pid="$(pid_of "$name")"
    for _ in $(seq 300); do
        if curl -fsS -o /dev/null --max-time 2 "$@" "$url" 2>/dev/null; then
            log "$name is up ($url)"
            return 0
        fi
        kill -0 "$pid" 2>/dev/null || die "$name (pid $pid) exited; see $DIR/logs/$name.log"
        sleep 0.1
    done
    die "$name not healthy at $url after 30 s"
}

# pull_via NAME PORT: pulls the demo image through an agent and checks every blob's sha256.
pull_via() {
    local name=$1 port=$2 out="$DIR/pull-$1"
    local base="http://$HOST:$port/v2/$IMAGE"
    mkdir -p "$out"
    log "pulling $IMAGE:$TAG through $name ($HOST:$port)"
    curl -fsS -H "Accept: $MANIFEST_ACCEPT" -D "$out/manifest.headers" -o "$out/manifest.json" \
        "$base/manifests/$TAG" || die "GET manifest through $name failed"
    local got
    got="sha256:$(sha256sum "$out/manifest.json" | cut -d' ' -f1)"
    [[ "$got" == "$MANIFEST_DIGEST" ]] || die "manifest through $name has digest $got, expected $MANIFEST_DIGEST"
    local header
    header="$(tr -d '\r' <"$out/manifest.headers" | awk -F': ' 'tolower($1) == "docker-content-digest" { print $2 }')"
    [[ -z "$header" || "$header" == "$MANIFEST_DIGEST" ]] ||
        die "Docker-Content-Digest through $name is $header, expected $MANIFEST_DIGEST"
    echo "OK  manifest $got"
    local digests digest n=0
    digests="$(grep -o 'sha256:[0-9a-f]\{64\}' "$out/manifest.json" | awk '!seen[$0]++')"
    [[ -n "$digests" ]] || die "no blob digests in the manifest through $name"
    for digest in $digests; do
        curl -fsS -o "$out/blob" "$base/blobs/$digest" || die "GET blob $digest through $name failed"
        got="sha256:$(sha256sum "$out/blob" | cut -d' ' -f1)"
        [[ "$got" == "$digest" ]] || die "blob $digest through $name has digest $got"
        echo "OK  blob     $digest ($(stat -c %s "$out/blob") bytes)"
        n=$((n + 1))
    done
    rm -f "$out/blob"
    log "$name served the manifest and $n blobs, all sha256-verified"
}

main() {
    local check=0
    case "${1:-}" in
        stop)
            check_dir
            stop_cluster
            return 0
            ;;
        --check) check=1 ;;
        "") ;;
        -h | --help)
            usage
            return 0
            ;;
        *)
            usage >&2
            die "unknown argument: $1"
            ;;
    esac
    check_dir
    [[ "$ORIGINS" =~ ^[1-9]$ ]] || die "SHOAL_DEV_ORIGINS must be 1 to 9, not $ORIGINS"

    if [[ "${SHOAL_DEV_NO_BUILD:-}" != 1 ]]; then
        log "building (cargo build --release --workspace)"
        (cd "$ROOT" && cargo build --release --workspace --quiet)
    fi
    local b
    for b in shoal-origin shoal-tracker shoal-agent shoal-bench; do
        [[ -x "$BIN/$b" ]] || die "$BIN/$b missing; build the workspace first"
    done

    # A previous cluster in the same directory is stopped before the directory is wiped.
    stop_cluster
    rm -rf "$DIR"
    mkdir -p "$DIR/logs"
    : >"$PIDS"

    # From here on, a failure stops whatever was started (and --check always stops).
    trap 'status=$?; if [[ $status -ne 0 ]]; then print_tails; stop_cluster; fi' EXIT
    if [[ $check -eq 1 ]]; then
        trap 'status=$?; if [[ $status -ne 0 ]]; then print_tails; fi; stop_cluster' EXIT
    fi

    log "certificates in $DIR/tls"
    {
        NO_COLOR=1 "$BIN/shoal-origin" ca init "$DIR/tls/ca"
        NO_COLOR=1 "$BIN/shoal-origin" ca issue --ca "$DIR/tls/ca" --name tracker --role tracker "$DIR/tls/tracker"
        NO_COLOR=1 "$BIN/shoal-origin" ca issue --ca "$DIR/tls/ca" --name origin --role origin "$DIR/tls/origin"
        for ((i = 2; i <= ORIGINS; i++)); do
            NO_COLOR=1 "$BIN/shoal-origin" ca issue --ca "$DIR/tls/ca" --name "origin$i" --role origin "$DIR/tls/origin$i"
        done
        for b in agent1 agent2; do
            NO_COLOR=1 "$BIN/shoal-origin" ca issue --ca "$DIR/tls/ca" --name "$b" --role agent "$DIR/tls/$b"
        done
    } >"$DIR/logs/ca.log" 2>&1 || { cat "$DIR/logs/ca.log" >&2; die "certificate setup failed"; }

    local origin_url="http://$HOST:$ORIGIN_PORT" tracker_url="https://$HOST:$TRACKER_PORT"
    # The tracker admits only agent and origin certificates of this CA: curl shows agent1's.
    local as_agent=(--cacert "$DIR/tls/agent1/ca.pem" --cert "$DIR/tls/agent1/cert.pem" --key "$DIR/tls/agent1/key.pem")
    # Origin 1 is "origin" (as with one origin); the others origin2, origin3, ...
    # Public ports (pushes, curl) in urls; the internal listeners (mutual TLS), which the
    # tracker and the ring call with their certificates, in internal.
    local names=(origin) urls=("$origin_url") internal=("https://$HOST:$ORIGIN_INTERNAL_PORT") ring=() i
    for ((i = 2; i <= ORIGINS; i++)); do
        names+=("origin$i")
        urls+=("http://$HOST:$((ORIGIN_PORT + 2 * (i - 1)))")
        internal+=("https://$HOST:$((ORIGIN_INTERNAL_PORT + i - 1))")
    done
    if [[ $ORIGINS -gt 1 ]]; then
        for i in "${internal[@]}"; do ring+=(--cluster "$i"); done
        start tracker shoal-tracker serve --http "$HOST:$TRACKER_PORT" --tls "$DIR/tls/tracker" \
            "${internal[@]/#/--origin=}" --replicas 2
    else
        start tracker shoal-tracker serve --http "$HOST:$TRACKER_PORT" --tls "$DIR/tls/tracker" \
            --origin "${internal[0]}"
    fi
    for ((i = 0; i < ORIGINS; i++)); do
        start "${names[$i]}" shoal-origin serve --http "${urls[$i]#http://}" \
            --internal "${internal[$i]#https://}" \
            --peer "$HOST:$((ORIGIN_PEER_PORT + 2 * i))" --data "$DIR/${names[$i]}" \
            --tls "$DIR/tls/${names[$i]}" "${ring[@]+"${ring[@]}"}"
    done
    start agent1 shoal-agent serve --registry "$HOST:$AGENT1_PORT" --peer "$HOST:$AGENT1_PEER_PORT" \
        --data "$DIR/agent1" --tls "$DIR/tls/agent1" --tracker "$tracker_url"
    start agent2 shoal-agent serve --registry "$HOST:$AGENT2_PORT" --peer "$HOST:$AGENT2_PEER_PORT" \
        --data "$DIR/agent2" --tls "$DIR/tls/agent2" --tracker "$tracker_url"
    wait_http tracker "$tracker_url/healthz" "${as_agent[@]}"
    # Without a cluster certificate the tracker refuses the handshake.
    if curl -fsS -o /dev/null --max-time 2 --cacert "$DIR/tls/ca/ca.pem" "$tracker_url/healthz" 2>/dev/null; then
        die "the tracker answered a caller without a certificate"
    fi
    echo "OK  tracker refuses callers without a cluster certificate (mutual TLS)"
    # The origins' internal listeners admit tracker and origin certificates only.
    local as_tracker=(--cacert "$DIR/tls/tracker/ca.pem" --cert "$DIR/tls/tracker/cert.pem" --key "$DIR/tls/tracker/key.pem")
    wait_http "${names[0]}" "${internal[0]}/healthz" "${as_tracker[@]}"
    if curl -fsS -o /dev/null --max-time 2 "${as_agent[@]}" "${internal[0]}/healthz" 2>/dev/null; then
        die "an origin's internal listener answered an agent certificate"
    fi
    echo "OK  origin internal listeners admit only tracker and origin certificates (mutual TLS)"
    for ((i = 0; i < ORIGINS; i++)); do
        wait_http "${names[$i]}" "${urls[$i]}/healthz"
    done
    wait_http agent1 "http://$HOST:$AGENT1_PORT/v2/"
    wait_http agent2 "http://$HOST:$AGENT2_PORT/v2/"

    log "generating a demo image (layers of 1 and 3 MiB) in $DIR/image"
    MANIFEST_DIGEST="$("$BIN/shoal-bench" gen-image --dir "$DIR/image" --tag "$TAG" \
        --layers 1048576,3145728 --seed 42)"
    log "manifest $MANIFEST_DIGEST"
    log "pushing it as $IMAGE:$TAG"
    NO_COLOR=1 "$BIN/shoal-origin" push --origin "$origin_url" "oci:$DIR/image:$TAG" "$IMAGE:$TAG" \
        >"$DIR/logs/push.log" 2>&1 || { cat "$DIR/logs/push.log" >&2; die "push failed"; }
    log "$(tail -n 1 "$DIR/logs/push.log")"

    pull_via agent1 "$AGENT1_PORT"
    pull_via agent2 "$AGENT2_PORT"

    if [[ $ORIGINS -gt 1 ]]; then
        # Every blob on its two owners: count the copies each origin holds.
        local copies=0 n
        for ((i = 0; i < ORIGINS; i++)); do
            n="$(find "$DIR/${names[$i]}/blobs" -type f | wc -l)"
            echo "OK  ${names[$i]} holds $n blobs"
            copies=$((copies + n))
        done
        log "the ring holds $copies copies of the image's blobs (two owners each, plus the origin pushed through)"
    fi

    if command -v skopeo >/dev/null; then
        log "skopeo inspect through agent1"
        skopeo inspect --tls-verify=false "docker://$HOST:$AGENT1_PORT/$IMAGE:$TAG" >"$DIR/skopeo-inspect.json" ||
            die "skopeo inspect failed"
        grep -q "$MANIFEST_DIGEST" "$DIR/skopeo-inspect.json" ||
            die "skopeo reports another digest: $(cat "$DIR/skopeo-inspect.json")"
        echo "OK  skopeo inspect: $MANIFEST_DIGEST"
    else
        log "skopeo not installed; skipping skopeo inspect"
    fi

    cat <<EOF

Shoal dev cluster is up (data in $DIR).

  tracker  $tracker_url             pid $(pid_of tracker)  log $DIR/logs/tracker.log
           (mutual TLS: curl ${as_agent[*]} $tracker_url/status)
$(for ((i = 0; i < ORIGINS; i++)); do
    printf '  %-8s %s (internal %s, peer udp %s)  pid %s  log %s\n' "${names[$i]}" "${urls[$i]}" \
        "${internal[$i]}" "$((ORIGIN_PEER_PORT + 2 * i))" "$(pid_of "${names[$i]}")" "$DIR/logs/${names[$i]}.log"
done)
  agent1   http://$HOST:$AGENT1_PORT (peer udp $AGENT1_PEER_PORT)  pid $(pid_of agent1)  log $DIR/logs/agent1.log
  agent2   http://$HOST:$AGENT2_PORT (peer udp $AGENT2_PEER_PORT)  pid $(pid_of agent2)  log $DIR/logs/agent2.log

Push more images:
  $BIN/shoal-origin push --origin $origin_url oci:DIR[:REF] NAME:TAG
  $BIN/shoal-origin push --origin $origin_url docker-archive:FILE NAME:TAG

Pull directly from an agent:
  ctr images pull --plain-http $HOST:$AGENT1_PORT/$IMAGE:$TAG
  skopeo inspect --tls-verify=false docker://$HOST:$AGENT1_PORT/$IMAGE:$TAG

Use agent1 as a containerd mirror for a registry, e.g. docker.io (writes
/etc/containerd/certs.d/docker.io/hosts.toml and prints the containerd config lines):

  $BIN/shoal-agent containerd-config --endpoint http://$HOST:$AGENT1_PORT --registry docker.io

The agent serves the images pushed to the origin under the same name (start the origin
with --upstream https://registry-1.docker.io to pull anything else through the cluster);
for anything it cannot serve containerd falls back to the registry itself.

Stop the cluster:
  $ROOT/deploy/dev-cluster.sh stop${SHOAL_DEV_DIR:+   (with SHOAL_DEV_DIR=$DIR)}
EOF
    if [[ $check -eq 1 ]]; then
        log "--check: stopping the cluster"
    fi
}

main "$@"
