#!/bin/bash
# User-space instructions per request of `nodemesh proxy -c`, counted by callgrind:
# repeatable for the same binary and inputs whatever else the machine runs (unlike CPU
# time), so a change to the request path can be judged on a loaded machine.
#
#   benches/profile/callgrind.sh http1|h2c|grpc [OUT]
#
# Needs the release build (`cargo build --release -p nodemesh -p nodemesh-simnode --bins`;
# it keeps debug info, so `callgrind_annotate OUT` names the functions) and valgrind.
# One worker, an upstream on 127.0.0.1:28481 spoken in the downstream's protocol (as in
# the sidecar benchmark), 1,000 requests at 100/s over 4 connections after a warm-up that
# is not counted. The proxy listens on 127.0.0.1:28480 (proxy.yaml).
set -euo pipefail
proto=${1:?usage: callgrind.sh http1|h2c|grpc [OUT]}
out=${2:-target/callgrind.$proto.out}
here=$(cd "$(dirname "$0")" && pwd)
bin=$here/../../target/release
load() {
    "$bin/nm-httpapp" load --connect 127.0.0.1:28480 --authority x --rate 100 \
        --connections 4 --warmup-ms 0 --protocol "$proto" --duration-ms "$1"
}
"$bin/nm-httpapp" serve --listen 127.0.0.1:28481 --name up > /dev/null 2>&1 &
up=$!
valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$out" \
    "$bin/nodemesh" proxy -c "$here/proxy.yaml" --concurrency 1 -l warn > /dev/null 2>&1 &
vg=$!
trap 'kill $vg $up 2>/dev/null; wait $vg $up 2>/dev/null || true' EXIT
for _ in $(seq 100); do
    (exec 3<>/dev/tcp/127.0.0.1/28480) 2>/dev/null && break
    sleep 0.1
done
load 1500 > /dev/null
callgrind_control -i on "$vg" > /dev/null 2>&1
requests=$(load 10000 | python3 -c 'import json,sys; print(json.load(sys.stdin)["requests"])')
callgrind_control -i off "$vg" > /dev/null 2>&1
kill "$vg"
wait "$vg" 2>/dev/null || true
total=$(callgrind_annotate "$out" 2>/dev/null | awk '/PROGRAM TOTALS/ { gsub(",", "", $1); print $1 }')
echo "$proto: $requests requests, $((total / requests)) instructions per request ($out)"
