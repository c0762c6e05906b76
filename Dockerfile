# syntax=docker/dockerfile:1
# The tidewatch container image, as .github/workflows/release.yml publishes it
# (ghcr.io/tidewatch/tidewatch, linux/amd64 and linux/arm64): a release build of the
# `tidewatch` binary on distroless/cc (glibc, libgcc, CA certificates, no shell),
# running as the image's non-root user (65532). Every base image is named in full
# (registry/repository:tag), so docker, podman and buildah resolve the same images.
#
#   docker build -t tidewatch:dev .          (or `podman build`, `minikube image build`)
#   docker run --rm -p 50051:50051 -p 8080:8080 tidewatch:dev
#   docker buildx build --platform linux/amd64,linux/arm64 -t tidewatch:dev .
#
# Each platform is built natively for itself (under emulation when buildx builds a
# foreign one), so the Dockerfile names no target triple. Dependencies are compiled in
# their own layer (cargo-chef): a change to the code alone rebuilds only the
# workspace crates. The linter is hadolint (scripts/checks/release.sh).

ARG RUST_VERSION=1.95.0

FROM docker.io/library/rust:${RUST_VERSION}-slim-bookworm AS chef
ARG RUST_VERSION
# The toolchain of this image, not rust-toolchain.toml's (whose clippy and rustfmt the
# build does not need). The slim image brings gcc for the C code of dependencies
# (mimalloc); protoc comes from the protoc-bin-vendored crate.
ENV RUSTUP_TOOLCHAIN=${RUST_VERSION} \
    CARGO_PROFILE_RELEASE_STRIP=symbols \
    CARGO_TERM_COLOR=never
RUN cargo install cargo-chef --locked --version 0.1.78
WORKDIR /src

FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS builder
COPY --from=planner /src/recipe.json recipe.json
# Only the dependencies, from the recipe (a skeleton of the workspace): this layer is
# reused until Cargo.toml or Cargo.lock change.
RUN cargo chef cook --release --locked --package tidewatch-server --recipe-path recipe.json
COPY . .
RUN cargo build --release --locked --package tidewatch-server --bin tidewatch \
 && cp target/release/tidewatch /tidewatch \
 && /tidewatch --version

FROM gcr.io/distroless/cc-debian12:nonroot AS runtime
ARG VERSION=dev
LABEL org.opencontainers.image.title="tidewatch" \
      org.opencontainers.image.description="Streaming anomaly detection for device metrics" \
      org.opencontainers.image.source="https://github.com/tidewatch/tidewatch" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}"
COPY --from=builder /tidewatch /usr/local/bin/tidewatch
# Inside a container the service listens on every interface (the defaults bind
# 127.0.0.1); Kubernetes sets the same through its ConfigMap. MIMALLOC_ALLOW_THP=0
# keeps the allocator off transparent huge pages even on nodes where THP is
# "always": 2 MiB pages rounded the engine's memory up by ≈100 MiB at 1M devices
# (BENCHMARKS.md, memory), and a memory limit wants RSS to follow the devices.
ENV GRPC_ADDR=0.0.0.0:50051 \
    LISTEN_ADDR=0.0.0.0:8080 \
    MIMALLOC_ALLOW_THP=0
EXPOSE 50051 8080
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/tidewatch"]
