# syntax=docker/dockerfile:1
#
# hookrelay container image.
#
#   docker build -t hookrelay .
#
# Two stages: a full Rust toolchain builds a release binary, and a distroless
# runtime (glibc + libgcc + CA certificates, no shell, no package manager) runs
# it as the unprivileged "nonroot" user (uid/gid 65532). Nothing secret is
# baked in: the webhook secrets come from mounted files (compose `secrets:`,
# Kubernetes Secret volumes) named by HOOKRELAY_SOURCES__<NAME>__SECRET_FILES.

ARG RUST_IMAGE=rust:1-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot

FROM ${RUST_IMAGE} AS builder
WORKDIR /src
# The whole (filtered, see .dockerignore) context is copied: Cargo validates
# every target named in Cargo.toml, including examples and benches, so a
# "manifest-only" dependency layer would need stub files for each of them.
# The BuildKit cache mounts keep the registry and target dir across builds
# (target/ is a cache mount, hence the copy of the binary out of it).
# The spool directory must exist in the image and belong to the runtime user,
# so that a fresh named volume mounted there inherits that ownership
# (distroless has no shell to mkdir/chown at start-up).
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin hookrelay \
 && install -D -m 0755 target/release/hookrelay /out/usr/local/bin/hookrelay \
 && install -d -m 0750 /out/var/lib/hookrelay/spool

FROM ${RUNTIME_IMAGE}
LABEL org.opencontainers.image.title="hookrelay" \
      org.opencontainers.image.description="Webhook ingest gateway: verifies Patreon webhooks and publishes them to RabbitMQ as CloudEvents" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=builder /out/usr/local/bin/hookrelay /usr/local/bin/hookrelay
COPY --from=builder --chown=65532:65532 /out/var/lib/hookrelay /var/lib/hookrelay

# The two settings a container needs that differ from the built-in defaults:
# the admin listener on all interfaces (the orchestrator's probes and
# Prometheus must reach it; publish it only on a private network) and the
# spool on the volume below. Environment variables take precedence over the
# config file (HOOKRELAY_CONFIG), so override these with -e, not in the file.
ENV HOOKRELAY_ADMIN__LISTEN=0.0.0.0:9090 \
    HOOKRELAY_SPOOL__DIR=/var/lib/hookrelay/spool

USER 65532:65532
# 8080: public webhook ingest (POST /webhooks/{source}).
# 9090: admin (GET /metrics, /healthz, /readyz); keep it off the internet.
EXPOSE 8080 9090
# Events that could not be confirmed by the broker wait here; keep it on a
# volume so a restart does not lose them.
VOLUME ["/var/lib/hookrelay/spool"]

# No shell and no curl in the image: the binary probes its own admin port.
# Liveness only (/healthz); a broker outage must not get the relay restarted,
# since it keeps spooling meanwhile.
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD ["/usr/local/bin/hookrelay", "healthcheck"]

# SIGTERM (the default stop signal) starts the ordered drain.
ENTRYPOINT ["/usr/local/bin/hookrelay"]
CMD ["run"]
