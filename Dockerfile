# syntax=docker/dockerfile:1
# The tidewatch container image: a static (musl) release build of the `tidewatch` binary
# on distroless/static, running as the image's non-root user (65532): about 2 MB of
# base image plus the stripped binary (about 7 MB; the glibc build strips to 6.9 MB), so
# about 10 MB in all. A static binary needs no libc in the image; musl's own malloc
# (slow under many threads) does not matter, since the binary brings mimalloc as its
# global allocator (built from C by musl-gcc, hence musl-tools below).
#
#   docker build -t tidewatch:dev .          (or `minikube image build -t tidewatch:dev .`)
#   docker run --rm -p 50051:50051 -p 8080:8080 tidewatch:dev
#
# Dependencies are compiled in their own layer (cargo-chef): a change to the code alone
# rebuilds only the workspace crates.

ARG RUST_VERSION=1.95.0

FROM rust:${RUST_VERSION}-slim-bookworm AS chef
ARG RUST_VERSION
# The toolchain of this image, not rust-toolchain.toml's (whose clippy and rustfmt the
# build does not need); the musl target for a static binary; musl-gcc for the C code
# of dependencies (mimalloc).
ENV RUSTUP_TOOLCHAIN=${RUST_VERSION} \
    CARGO_PROFILE_RELEASE_STRIP=symbols \
    CARGO_TERM_COLOR=never
RUN apt-get update \
 && apt-get install -y --no-install-recommends musl-tools \
 && rm -rf /var/lib/apt/lists/* \
 && rustup target add x86_64-unknown-linux-musl \
 && cargo install cargo-chef --locked --version 0.1.78
WORKDIR /src

FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS builder
COPY --from=planner /src/recipe.json recipe.json
# Only the dependencies, from the recipe (a skeleton of the workspace): this layer is
# reused until Cargo.toml or Cargo.lock change.
RUN cargo chef cook --release --locked --target x86_64-unknown-linux-musl \
      --package tidewatch-server --recipe-path recipe.json
COPY . .
RUN cargo build --release --locked --target x86_64-unknown-linux-musl \
      --package tidewatch-server --bin tidewatch \
 && cp target/x86_64-unknown-linux-musl/release/tidewatch /tidewatch \
 && /tidewatch --version

FROM gcr.io/distroless/static-debian12:nonroot AS runtime
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
