# vip-agent container image: build with the pinned toolchains, ship the agent alone (the eBPF
# objects are embedded in it).
#
#   docker build -t vip-agent .
#   docker run -d --name vip --network host --privileged \
#     -v /sys/fs/bpf:/sys/fs/bpf -v /etc/vip:/etc/vip:ro vip-agent
#
# Instead of --privileged: --cap-add BPF --cap-add PERFMON --cap-add NET_ADMIN --cap-add NET_RAW
# --cap-add SYS_ADMIN (kernels before 5.8, or bpf_link pinning on some) --cap-add SYS_RESOURCE
# --security-opt apparmor=unconfined. The host's /sys/fs/bpf must be bind-mounted: a fresh bpffs
# inside the container would lose the pins, and with them hitless restarts.
FROM rust:1.95-bookworm AS build
RUN rustup toolchain install nightly --profile minimal --component rust-src
WORKDIR /src
COPY . .
RUN cargo xtask setup && cargo xtask build

FROM debian:bookworm-slim
COPY --from=build /src/target/release/vip-agent /usr/local/bin/vip-agent
ENTRYPOINT ["/usr/local/bin/vip-agent"]
CMD ["run", "--config", "/etc/vip/vip.toml"]
