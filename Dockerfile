# syntax=docker/dockerfile:1
#
# The operator image:
#
#   docker build -t tombstone:0.1.0 .
#
# The tag should be the crate version (Cargo.toml), which the Helm chart's appVersion tracks
# and uses as the default image tag. The binary is `/tombstone`; the chart and
# config/manager run `/tombstone run`.

# Build: a release binary against Debian bookworm's glibc, the same glibc the runtime
# image carries. The Rust version is the crate's rust-version.
FROM docker.io/library/rust:1.89-bookworm AS build
WORKDIR /src
# aws-lc-sys (TLS of the AWS SDK) compiles C code; cmake is its fallback build system.
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake \
 && rm -rf /var/lib/apt/lists/*
# Only what the build reads (Cargo.toml names the benches, so they must be present).
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin tombstone \
 && cp target/release/tombstone /tombstone

# Run: distroless "cc" (glibc, libgcc, CA certificates for the stores' TLS, no shell, no
# package manager), as the unprivileged user 65532 the chart's securityContext expects.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /tombstone /tombstone
USER 65532:65532
# /healthz, /readyz and /metrics (--http-addr).
EXPOSE 8080
ENTRYPOINT ["/tombstone"]
CMD ["run"]
