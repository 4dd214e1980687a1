# Static poulpe in a minimal Alpine image.
#   docker build -t poulpe .
#   docker run -d -p 8000:8000 -v poulpe-data:/data poulpe
FROM rust:1-alpine AS build
RUN apk add --no-cache musl-dev
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY examples ./examples
RUN cargo build --release --locked --bin poulpe

FROM alpine:3
RUN adduser -D -H -u 10001 poulpe && mkdir /data && chown poulpe /data
COPY --from=build /src/target/release/poulpe /usr/local/bin/poulpe
USER poulpe
EXPOSE 8000
VOLUME /data
HEALTHCHECK --interval=30s --timeout=3s CMD wget -q -O /dev/null http://127.0.0.1:8000/health || exit 1
CMD ["poulpe", "--bind", "0.0.0.0", "--data", "/data"]
