# edgemux image (Debian bookworm): a build stage with the -dev packages and a
# runtime stage with only the shared libraries, running as an unprivileged
# user. Holds edgemux, its plugins, platform-sim and edge-sim, so one image
# serves every role of docker-compose.yml.
#   docker build -t edgemux .
FROM debian:bookworm AS build
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      build-essential cmake pkg-config \
      libuv1-dev libyaml-dev libssl-dev zlib1g-dev \
      libwebsockets-dev libwebsockets-evlib-uv libhttp-parser-dev \
      libcurl4-openssl-dev libjansson-dev libc-ares-dev libzookeeper-mt-dev libsystemd-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# /usr and /etc so the built-in plugin dir and the sample config's paths
# are the ones the runtime stage has.
RUN cmake -S . -B /build -DCMAKE_BUILD_TYPE=RelWithDebInfo -DEMX_TESTS=OFF \
      -DCMAKE_INSTALL_PREFIX=/usr -DCMAKE_INSTALL_SYSCONFDIR=/etc \
 && cmake --build /build -j"$(nproc)" \
 && DESTDIR=/staging cmake --install /build \
 && install -D -m 0755 /build/tools/platform-sim/platform-sim /staging/usr/bin/platform-sim \
 && install -D -m 0755 /build/tools/edge-sim/edge-sim /staging/usr/bin/edge-sim

FROM debian:bookworm-slim
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      libuv1 libyaml-0-2 libssl3 zlib1g libwebsockets17 libwebsockets-evlib-uv libhttp-parser2.9 \
      libcurl4 libjansson4 libc-ares2 libzookeeper-mt2 libsystemd0 ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system edgemux \
 && useradd --system --gid edgemux --home-dir /nonexistent --no-create-home \
      --shell /usr/sbin/nologin edgemux
# Binaries and plugins stay root-owned: the plugin loader refuses plugins the
# running user could rewrite.
COPY --from=build /staging/ /
USER edgemux
EXPOSE 8080 9900 9901
ENTRYPOINT ["edgemux"]
CMD ["-c", "/etc/edgemux/edgemux.yaml"]
