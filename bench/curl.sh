#!/bin/bash
# Contender: the curl command per call, as a shell script would re-trigger.
# Each call is a new process, a new connection and a full TLS handshake.
#   bench/curl.sh BASE_URL CAFILE N h1|h2
# Prints: calls=N seconds=S etag=E label=L
set -eu
base=$1 ca=$2 n=$3 proto=$4
url="$base/runs/4fb0418e-1804-45d6-8d56-dd51f05c0baf/action?op=re-trigger"
if [ "$proto" = h1 ]; then version=--http1.1; else version=--http2; fi

start=$(date +%s%N)
for ((i = 0; i < n; i++)); do
  # read is a builtin: the id costs no extra process
  read -r id </proc/sys/kernel/random/uuid
  reply=$(curl -sS --fail --noproxy '*' "$version" --cacert "$ca" -X POST \
    -H 'Authorization: Bearer bench-token' -H 'x-api-key: bench-key' \
    -H 'x-gw-ims-org-id: BENCH@AdobeOrg' -H 'x-sandbox-name: prod' \
    -H 'Content-Type: application/json' -H 'Accept: application/json' \
    -H "x-request-id: $id" -A lua-flowservice-bench-curl "$url")
  case $reply in *'"id"'*) ;; *) echo "curl.sh: bad reply: $reply" >&2; exit 1 ;; esac
done
end=$(date +%s%N)

etag=${reply#*\"etag\":\"}
etag=${etag%\"\}*}
ns=$((end - start))
printf 'calls=%d seconds=%d.%09d etag=%s label=%s\n' "$n" $((ns / 1000000000)) $((ns % 1000000000)) "$etag" "curl CLI"
