# Tether in a container: a multi-stage build (the toolchain stays in the first stage), run as
# a non-root user, state (SQLite, the generated admin token) in a volume, a health check
# that asks the gateway's own readiness.
#
#   docker build -t tether .
#   docker run -p 7450:7450 -p 7451:7451 -v tether-state:/var/lib/tether tether
#   docker run ... tether serve --upstream-url http://mcp.internal:8000/mcp
#
# A stdio upstream must exist in the image: build FROM this one and add it (node, python,
# the server's binary), then `tether serve -- my-server ARGS`.

FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY crates crates
COPY examples examples
RUN cargo build --release --locked -p tether \
 && mkdir -p /out/man /out/completions \
 && ./target/release/tether man --dir /out/man \
 && ./target/release/tether completions bash > /out/completions/tether.bash

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /var/lib/tether --create-home tether
COPY --from=build /src/target/release/tether /usr/local/bin/tether
COPY --from=build /out/man /usr/local/share/man/man1
COPY --from=build /out/completions/tether.bash /usr/share/bash-completion/completions/tether
USER tether
ENV TETHER_STATE_DIR=/var/lib/tether \
    TETHER_LISTEN=0.0.0.0:7450 \
    TETHER_ADMIN_LISTEN=0.0.0.0:7451 \
    TETHER_LOG_FORMAT=json
VOLUME ["/var/lib/tether"]
EXPOSE 7450 7451
# The admin listener is not on loopback here, so every endpoint but the health checks needs
# the admin token: the generated one is in the volume (admin.token), or set
# TETHER_ADMIN_TOKEN. Without API keys ([[keys]]) anyone reaching port 7450 is anonymous.
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
  CMD ["tether", "health", "--admin", "127.0.0.1:7451"]
ENTRYPOINT ["tether"]
CMD ["serve", "--demo"]
