# openai-key-rotator container image.
#   docker build -t openai-key-rotator .
# Multi-stage: a Rust builder, then a distroless runtime (glibc, CA certificates, no shell)
# running as the numeric non-root user 65532 (the chart's runAsUser).

FROM rust:1-bookworm AS builder
WORKDIR /src
# Dependencies first, cached while only the sources change.
COPY Cargo.toml Cargo.lock ./
# (Cargo.toml declares the integration-test and benchmark targets: stubs keep the manifest
# loadable; neither is built here.)
RUN mkdir -p src tests/it benches && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs tests/it/main.rs && echo 'fn main() {}' > benches/rotation.rs \
    && cargo build --release --locked --no-default-features \
    && rm -rf src
COPY src ./src
# The simulators (feature "sandbox": demo, sandbox command) stay out of the image.
RUN touch src/main.rs src/lib.rs \
    && cargo build --release --locked --no-default-features \
    && install -m 0755 target/release/openai-key-rotator /openai-key-rotator

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=builder /openai-key-rotator /usr/local/bin/openai-key-rotator
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/openai-key-rotator"]
CMD ["run", "--config", "/etc/openai-key-rotator/config/config.toml"]
