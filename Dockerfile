# vip-agent container image: build with pinned toolchains, ship the agent alone (the eBPF
# objects are embedded in it) with bpftool and iproute2, which the troubleshooting guide uses.
#
#   docker build -t vip-agent .
#   docker run -d --name vip --network host \
#     --cap-add BPF --cap-add NET_ADMIN --cap-add PERFMON \
#     -v /sys/fs/bpf:/sys/fs/bpf -v /etc/vip:/etc/vip:ro vip-agent
#
# BPF, NET_ADMIN and PERFMON are enough on Linux 5.11 and later (tests/tests/deploy.rs runs the
# agent with exactly these); older kernels also need SYS_RESOURCE. The host's /sys/fs/bpf must
# be mounted (as bpffs) and bind-mounted here: a fresh bpffs inside the container would lose the
# pins, and with them hitless restarts. IP forwarding on the uplinks must be on (the agent turns
# it on where /proc/sys is writable).
FROM rust:1.95-bookworm AS build
# The nightly the eBPF crate builds with, by date, so that the image builds the same later.
ARG NIGHTLY=nightly-2026-05-20
ENV VIP_NIGHTLY=${NIGHTLY}
RUN rustup toolchain install ${NIGHTLY} --profile minimal --component rust-src
WORKDIR /src
COPY . .
RUN cargo xtask setup --build-only \
    && cargo xtask build \
    && strip target/release/vip-agent

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends bpftool iproute2 \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/vip-agent /usr/local/bin/vip-agent
ENTRYPOINT ["/usr/local/bin/vip-agent"]
CMD ["run", "--config", "/etc/vip/vip.toml"]
