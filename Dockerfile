# poulpe in a minimal Alpine image, from the static binary built on the host:
#   scripts/build-static.sh
#   docker build -t poulpe .
#   docker run -d -p 8000:8000 -v poulpe-data:/data poulpe
#
# A `scratch` image works too (the binary needs no libc, /etc, zoneinfo or CA bundle):
#   FROM scratch
#   COPY target/x86_64-unknown-linux-musl/release/poulpe /poulpe
#   COPY --chown=10001:10001 .dockerdata/ /data/     # an empty folder, so /data is writable
#   USER 10001:10001
#   EXPOSE 8000
#   VOLUME /data
#   HEALTHCHECK --interval=30s --timeout=5s CMD ["/poulpe", "health"]
#   ENTRYPOINT ["/poulpe"]
#   CMD ["--bind", "0.0.0.0", "--data", "/data"]
FROM alpine:3
RUN adduser -D -H -u 10001 poulpe && mkdir /data && chown poulpe:poulpe /data
COPY target/x86_64-unknown-linux-musl/release/poulpe /usr/local/bin/poulpe
USER poulpe
EXPOSE 8000
VOLUME /data
# `poulpe health` asks /health on 127.0.0.1 at POULPE_PORT (default 8000): no curl needed.
HEALTHCHECK --interval=30s --timeout=5s CMD ["/usr/local/bin/poulpe", "health"]
ENTRYPOINT ["/usr/local/bin/poulpe"]
CMD ["--bind", "0.0.0.0", "--data", "/data"]
