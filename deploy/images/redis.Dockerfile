# Redis from Debian's mirror, for sites that cannot pull redis:7 (air-gapped, CI here).
#   docker build -f deploy/images/redis.Dockerfile -t codeloop/redis:bookworm deploy/images
ARG BASE=codeloop/base:bookworm
FROM ${BASE}
RUN set -eu; apt-get update; \
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends redis-server; \
    rm -rf /var/lib/apt/lists/*; mkdir -p /data; chown redis:redis /data
USER redis
WORKDIR /data
EXPOSE 6379
CMD ["redis-server", "--bind", "0.0.0.0", "--protected-mode", "no"]
