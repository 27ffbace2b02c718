# fencegate: multi-stage build, slim non-root runtime.
# Not built in this project's CI (no Docker engine there); kept conventional.
FROM rust:1-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends protobuf-compiler libprotobuf-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
# Cargo.toml declares the criterion bench: without its file cargo refuses
# the manifest, even for --bin.
COPY benches ./benches
RUN cargo build --release --locked --bin fencegate

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --home-dir /var/lib/fencegate fencegate \
    && mkdir -p /etc/fencegate /var/lib/fencegate/data \
    && chown -R fencegate /var/lib/fencegate
COPY --from=build /src/target/release/fencegate /usr/local/bin/fencegate
COPY config/fencegate.toml /etc/fencegate/fencegate.toml
USER fencegate
# The shipped config's relative state path (data/fencegate.redb) lands in the volume.
WORKDIR /var/lib/fencegate
# The configuration, and the state file that must outlive the container.
VOLUME ["/etc/fencegate", "/var/lib/fencegate"]
# 8080: the proxy; 9100: /metrics, /healthz, /readyz, /domains.
EXPOSE 8080 9100
HEALTHCHECK --interval=10s --timeout=3s CMD ["fencegate", "healthcheck", "--config", "/etc/fencegate/fencegate.toml"]
ENTRYPOINT ["fencegate"]
CMD ["run", "--config", "/etc/fencegate/fencegate.toml"]
