#!/usr/bin/env bash
# fuzz/run.sh TARGET SECONDS [N]: runs build/fuzz/TARGET for SECONDS on a
# temporary copy of fuzz/corpus/TARGET (libFuzzer adds what it finds to
# its first corpus directory: the checkout stays clean), then prints one
# TAP line, numbered N (default 1):
#   ok N - fuzz TARGET ran 20 s clean (123456 execs)
# A crash is kept as build/fuzz/crashes/TARGET-*; the log is build/fuzz/TARGET.log.
# FUZZ_KEEP_CORPUS=DIR keeps the grown corpus in DIR (to curate new seeds).
set -uo pipefail
cd "$(dirname "$0")/.."

target=$1 seconds=$2 n=${3:-1}
bin=build/fuzz/$target
log=build/fuzz/$target.log
work=$(mktemp -d "${TMPDIR:-/tmp}/flowservice-fuzz.XXXXXX")
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/corpus" build/fuzz/crashes
cp fuzz/corpus/"$target"/* "$work/corpus/" 2>/dev/null

case $target in
  reply) max_len=16384 ;;
  *) max_len=4096 ;;
esac

ASAN_OPTIONS=${ASAN_OPTIONS:-abort_on_error=1:detect_leaks=1} \
UBSAN_OPTIONS=${UBSAN_OPTIONS:-halt_on_error=1:print_stacktrace=1} \
  "$bin" -max_total_time="$seconds" -max_len="$max_len" -timeout=10 -print_final_stats=1 \
  -artifact_prefix="$work/" "$work/corpus" >"$log" 2>&1
status=$?

execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
if [ -n "${FUZZ_KEEP_CORPUS:-}" ]; then
  mkdir -p "$FUZZ_KEEP_CORPUS" && cp "$work"/corpus/* "$FUZZ_KEEP_CORPUS"/
fi
if [ "$status" -eq 0 ] && [ -n "$execs" ]; then
  echo "ok $n - fuzz $target ran $seconds s clean ($execs execs, corpus $(ls "$work/corpus" | wc -l))"
  exit 0
fi
for f in "$work"/crash-* "$work"/leak-* "$work"/timeout-* "$work"/oom-*; do
  [ -e "$f" ] && cp "$f" "build/fuzz/crashes/$target-$(basename "$f")"
done
echo "not ok $n - fuzz $target failed after ${execs:-?} execs (exit $status; see $log, build/fuzz/crashes/)"
grep -m1 -E '^(fuzz:|==[0-9]+==ERROR|SUMMARY)' "$log" | sed 's/^/# /'
exit 1
