#!/usr/bin/env bash
# The cluster tests (README "Running more than one"): starts a three-node RabbitMQ cluster beside
# the default broker (AMQP ports 5680-5682, its own Erlang cookie and epmd; 5672 is never touched),
# runs tests/cluster/ against it with two relay processes, prints the failover table, and takes the
# cluster down again, also when a test fails or the run is interrupted.
#
#   bash tests/cluster/run.sh            # about 4 minutes; ~0.4 GiB for the three nodes
#
# Environment: HOOKRELAY_CLUSTER_EVENTS (events per scenario, default 20000), HRC_BASE_PORT
# (default 5680), HRC_DIR (cluster state, default /tmp/hookrelay-cluster).
set -euo pipefail
cd "$(dirname "$0")/../.."
SCRIPT=$PWD/tests/cluster/rabbit-cluster.sh
export HRC_DIR=${HRC_DIR:-/tmp/hookrelay-cluster}

# Build first, so the cluster does not sit idle during a compile.
cargo test --test cluster --no-run

# A run killed before its trap ran leaves a cluster behind: take it down (only ever our own dir).
bash "$SCRIPT" down
trap 'bash "$SCRIPT" down' EXIT
bash "$SCRIPT" up "${HRC_BASE_PORT:-5680}" >/dev/null

HOOKRELAY_CLUSTER_SCRIPT=$SCRIPT cargo test --test cluster -- --ignored --nocapture --test-threads=1
