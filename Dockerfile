# gormic-gateway container image: build with the official Rust image, run the
# one binary on distroless "cc" (glibc, libgcc, CA certificates, tzdata; no
# shell, no package manager), as the non-root user 65532.
#
#   docker build --build-arg GORMIC_GIT_COMMIT="$(git rev-parse HEAD)" \
#       -t registry.example.com/gormic/gormic-gateway:0.1.0 .
#
# Why distroless cc and not a static musl binary FROM scratch: the gateway
# links glibc dynamically (the default Rust target); building it for musl
# would change its allocator and its performance, which are measured on glibc.
# distroless cc is that glibc and nothing else, plus /etc/ssl/certs for HTTPS
# upstreams and /etc/passwd with the "nonroot" user. The build stage is
# Debian 12 (bookworm) like cc-debian12, so the binary needs no newer glibc
# than the image has.
#
# Rust 1.95.0 is the toolchain CI tests with (Cargo.toml: rust-version 1.88).
# Both base images are pinned by tag; pin them by digest in your build
# pipeline if it must be reproducible bit for bit (docs/operations.md).

FROM rust:1.95.0-bookworm AS build
WORKDIR /src
# Only what `cargo build` reads: the manifest and lock file, build.rs and the
# protos it compiles, the sources, and benches/ (Cargo.toml declares a bench
# target, which cargo resolves even when it does not build it).
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto ./proto
COPY src ./src
COPY benches ./benches
# The commit ends up in gormic_gateway_build_info{git_commit}: the binary reads
# GORMIC_GIT_COMMIT with option_env! at compile time, and a build argument is
# in the environment of the RUN steps after its ARG. .git is not in the build
# context, so it is passed in: --build-arg GORMIC_GIT_COMMIT=$(git rev-parse HEAD)
# (left out, the variable is unset and the binary reports its own fallback).
ARG GORMIC_GIT_COMMIT
# --locked: exactly the dependency versions CI tested (Cargo.lock).
# The cache mounts keep crates and compiled dependencies between builds
# (BuildKit); the binary is copied out of the cached target directory.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked \
    && cp target/release/gormic-gateway /gormic-gateway

FROM gcr.io/distroless/cc-debian12:nonroot
ARG GORMIC_GIT_COMMIT
LABEL org.opencontainers.image.title="gormic-gateway" \
      org.opencontainers.image.description="gRPC gateway in front of the Gormic invoices REST API" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.revision="${GORMIC_GIT_COMMIT}"
COPY --from=build /gormic-gateway /gormic-gateway
# The :nonroot tag already runs as 65532; said again so that no base image
# change can make the gateway run as root.
USER 65532:65532
# gRPC (and gRPC-Web) on 50051; admin HTTP (/metrics, /livez, /readyz) on 20051,
# which listens on 127.0.0.1 unless GORMIC_ADMIN_LISTEN says otherwise
# (Kubernetes sets 0.0.0.0:20051 so that the kubelet and Prometheus reach it).
EXPOSE 50051 20051
# checkov:skip=CKV_DOCKER_2:No HEALTHCHECK: it would need a program inside the image to run (there is no shell or curl), and Kubernetes ignores it; the kubelet probes /livez and /readyz over HTTP instead (deploy/kubernetes/deployment.yaml).
ENTRYPOINT ["/gormic-gateway"]
