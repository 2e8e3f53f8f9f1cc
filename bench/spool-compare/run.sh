#!/usr/bin/env bash
# Runs the comparison: 5 alternating rounds per engine (medians reported),
# then one run per engine under strace to count fsync/fdatasync calls.
# Usage: bench/spool-compare/run.sh [records] [appenders] [payload_bytes] [drain_batch]
set -euo pipefail
cd "$(dirname "$0")"
cargo build --release --quiet
BIN=./target/release/spool-compare
ARGS=("${@}")
OUT=$(mktemp)
for round in 1 2 3 4 5; do
  for e in spool redb fjall; do
    sync; sleep 1   # let the previous run's writeback settle
    "$BIN" "$e" "${ARGS[@]}" | tee -a "$OUT"
  done
done
echo
echo "medians over 5 rounds (records appended by 64 tasks, each append durable; drain = peek batch + durable remove):"
for e in spool redb fjall; do
  grep "^$e " "$OUT" | awk -v e="$e" '
    { ga = 0; gd = 0
      for (i = 1; i <= NF; i++) {
        if ($i == "append" && !ga) { a[NR] = $(i+1); ga = 1 }
        if ($i == "drain" && !gd) { d[NR] = $(i+1); gd = 1 }
      }
      n = NR }
    END {
      asort(a); asort(d); m = int((n + 1) / 2);
      printf "  %-6s append %7.0f ev/s (min %6.0f, max %6.0f)   drain %7.0f ev/s (min %6.0f, max %6.0f)\n", e, a[m], a[1], a[n], d[m], d[1], d[n]
    }'
done
if command -v strace >/dev/null; then
  echo
  echo "fsync + fdatasync calls (whole process, one run each, under strace):"
  for e in spool redb fjall; do
    strace -f -c -e trace=fsync,fdatasync -o "$OUT.strace" "$BIN" "$e" "${ARGS[@]}" >/dev/null
    awk -v e="$e" '$NF == "fsync" || $NF == "fdatasync" { c[$NF] = $(NF-1) + 0 }
      END { printf "  %-6s fdatasync %5d  fsync %5d  total %5d\n", e, c["fdatasync"], c["fsync"], c["fdatasync"] + c["fsync"] }' "$OUT.strace"
  done
fi
rm -f "$OUT" "$OUT.strace"
