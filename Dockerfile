# syntax=docker/dockerfile:1

# Build stage: compiles the release binary. The toolchain tag is pinned so
# that a rebuild uses the same compiler.
FROM rust:1.95-slim-bookworm AS build
WORKDIR /build

# Compile the dependencies alone first, against placeholder sources, so that
# this layer is reused while Cargo.toml and Cargo.lock stay unchanged.
COPY Cargo.toml Cargo.lock ./
RUN mkdir src \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && cargo build --release --locked \
    && rm -rf src

# sqlx::migrate! embeds migrations/ at compile time, so it must be present
# before the crate itself is compiled. build.rs rebuilds the crate when a
# migration changes.
COPY build.rs ./
COPY migrations ./migrations
COPY src ./src
# COPY keeps the files' own modification times, which can be older than the
# placeholders above. Touching the crate roots makes cargo rebuild the crate.
RUN touch src/main.rs src/lib.rs \
    && cargo build --release --locked \
    && install -m 0755 target/release/reencrypt /usr/local/bin/reencrypt

# Run stage: the binary, CA certificates for TLS to PostgreSQL and Vault, and
# an unprivileged user. Bookworm matches the build stage's glibc.
FROM debian:12.13-slim

# Package versions are not pinned: the image tag fixes the Debian point
# release, and pinning would fail the build once the archive drops a version.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 1001 reencrypt \
    && useradd --system --uid 1001 --gid 1001 --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin reencrypt

COPY --from=build /usr/local/bin/reencrypt /usr/local/bin/reencrypt

# Numeric, so that Kubernetes can check runAsNonRoot without reading /etc/passwd.
USER 1001:1001

# Prometheus /metrics listener (REENCRYPT_METRICS_LISTEN).
EXPOSE 9464

ENTRYPOINT ["/usr/local/bin/reencrypt"]
CMD ["--help"]
