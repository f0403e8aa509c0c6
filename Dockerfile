# syntax=docker/dockerfile:1
# Build stage: Rust toolchain plus protoc, which etcd-client needs to compile etcd's protos.
FROM rust:1-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends protobuf-compiler \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p etcd-medic \
 && cp target/release/etcd-medic /etcd-medic

# Final stage: a slim Debian with the binary only (issue #6 makes it smaller still).
FROM debian:bookworm-slim
LABEL org.opencontainers.image.title="etcd-medic" \
      org.opencontainers.image.description="Node agent that heals etcd members stuck in 'member not found' crash loops" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /etcd-medic /usr/local/bin/etcd-medic
# The agent acts on the kubelet's volumes, which needs root on the node (deploy/README.md).
ENTRYPOINT ["/usr/local/bin/etcd-medic"]
CMD ["serve"]
