#!/usr/bin/env bash
# Builds the relay and the benchmark in release mode, then runs the benchmark against
# the local RabbitMQ. Arguments go to hookrelay-bench, e.g. `--quick` (under 30 s),
# `--rounds 5`, `--size 1024`, `--concurrency 1,64`; see `--help`.
set -euo pipefail
cd "$(dirname "$0")/.."
target="${CARGO_TARGET_DIR:-target}"
cargo build --release --locked --bin hookrelay --bin hookrelay-bench
exec "$target/release/hookrelay-bench" --relay-bin "$target/release/hookrelay" "$@"
