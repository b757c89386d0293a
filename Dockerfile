# Build: docker build -t callcoach .   Run: docker run --env-file .env callcoach web
FROM rust:1.94-slim-bookworm AS build
WORKDIR /src
RUN apt-get update && apt-get install -y --no-install-recommends cmake clang pkg-config && rm -rf /var/lib/apt/lists/*
COPY . .
RUN cargo build --release --locked && strip target/release/callcoach

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* && useradd --system --home /app callcoach
WORKDIR /app
COPY --from=build /src/target/release/callcoach /usr/local/bin/callcoach
COPY --from=build /src/jobs /app/jobs
USER callcoach
ENV BIND_ADDR=0.0.0.0:8080 METRICS_ADDR=0.0.0.0:9187 LOG_FORMAT=json
EXPOSE 8080 9187
ENTRYPOINT ["callcoach"]
CMD ["web"]
