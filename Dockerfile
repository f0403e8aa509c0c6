# syntax=docker/dockerfile:1
# Build stage: the Rust toolchain plus protoc (etcd-client compiles etcd's protos), then the
# same static release binary CI builds (scripts/build-release).
FROM rust:1-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends protobuf-compiler \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cp "$(./scripts/build-release)" /etcd-medic \
 && mkdir -p /rootfs/var/lib/etcd-medic /rootfs/tmp

# etcd itself, the same minor as the Bitnami image's: `etcd-medic rebuild` runs it on a
# fenced survivor's data (quorum lost). A static Go binary.
FROM gcr.io/etcd-development/etcd:v3.5.34 AS etcd

# Final stage: nothing but the static binaries (no shell, no libc, no package manager).
FROM scratch
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="etcd-medic" \
      org.opencontainers.image.description="Node agent that heals etcd members stuck in 'member not found' crash loops" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.documentation="README.md and deploy/README.md in the source"
COPY --from=build /rootfs/ /
COPY --from=build /etcd-medic /etcd-medic
COPY --from=etcd /usr/local/bin/etcd /usr/local/bin/etcd
# Root, by necessity: the agent renames files on volumes owned by the workloads' users. The
# DaemonSet drops every capability but DAC_OVERRIDE and SYS_PTRACE (deploy/README.md).
USER 0:0
EXPOSE 9464
ENTRYPOINT ["/etcd-medic"]
CMD ["serve"]
