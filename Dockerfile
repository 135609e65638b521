# syntax=docker/dockerfile:1
#
# Two stages: a Debian bookworm Rust toolchain builds the `auditflow` binary (librdkafka is compiled
# from source by rdkafka-sys, hence the C toolchain, perl and python3), and a slim bookworm image
# runs it. Build with `docker build -t auditflow .` or through docker-compose.yml.
#
# Rust 1.89 is the floor: Cargo.lock pins crates (uuid 1.29) that need it, so `--locked` fails on
# older toolchains. Override with `--build-arg RUST_VERSION=...`.
ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS builder

RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        build-essential \
        libssl-dev \
        perl \
        pkg-config \
        python3 \
        zlib1g-dev \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /build
COPY Cargo.toml Cargo.lock ./
# `migrations/` and `schemas/` are embedded at compile time (sqlx::migrate!, include_str!).
COPY migrations ./migrations
COPY schemas ./schemas
COPY src ./src

# The cache mounts keep the registry and compiled dependencies (librdkafka takes minutes) between
# builds; the binary is copied out because the target directory is not part of the image.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/build/target \
    cargo build --release --locked --bin auditflow \
    && cp target/release/auditflow /usr/local/bin/auditflow

FROM debian:bookworm-slim

# libssl3: openssl-sys links dynamically; ca-certificates: TLS to Kafka, Postgres or Redis.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates libssl3 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin auditflow

COPY --from=builder /usr/local/bin/auditflow /usr/local/bin/auditflow
# Writer schemas read at start-up; newer ones can be mounted over this directory without a rebuild.
COPY schemas /app/schemas

WORKDIR /app
ENV AUDITFLOW_SCHEMA_DIR=/app/schemas \
    AUDITFLOW_METRICS_ADDR=0.0.0.0:9000
USER auditflow
# Prometheus metrics (AUDITFLOW_METRICS_ADDR).
EXPOSE 9000

ENTRYPOINT ["auditflow"]
CMD ["run"]
