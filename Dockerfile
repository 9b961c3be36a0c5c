# syntax=docker/dockerfile:1
# task-executor image: build with cargo (scripts/build-release), run on debian:bookworm-slim.
#   docker build -t task-executor:dev .
# The agent needs no shell and no nsenter (sidecar mode enters namespaces itself);
# bookworm-slim is kept rather than distroless so that host-mode tasks, which run
# inside this container, still find /bin/sh and coreutils.

FROM rust:1.95-bookworm AS build
# protoc: the k8s-cri crate generates its CRI gRPC bindings in build.rs.
# Not version-pinned: Debian security updates replace exact revisions, which would
# break the build; the bookworm suite itself is the pin.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends protobuf-compiler \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# The same script CI builds and smoke-tests the release binary with: `cargo build
# --release --locked` (exactly the dependency set in Cargo.lock), static-pie.
RUN bash scripts/build-release /out

FROM debian:bookworm-slim
# The binary sits where upstream OpenSandbox's image keeps its agent, /workspace/server:
# upstream's Pool samples install it with an init container that runs
# `cp /workspace/server /opt/opensandbox/task-executor` into an emptyDir and start the copy
# in the sandbox's main container (docs/deploying.md: "Upstream's Pool sample"). The file itself is
# there (a symlink would not survive a `COPY --from` of that path); the name on PATH
# links to it. The binary is static, so the copy runs in any image (busybox, distroless).
COPY --from=build /out/task-executor /workspace/server
# Default data dir, writable by the unprivileged default user (a bare `docker run`: tasks
# then run as that user too). The chart runs the agent as root with a few capabilities,
# mounts a volume here, and runs tasks as another user (charts/task-executor).
RUN ln -s /workspace/server /usr/local/bin/task-executor \
    && mkdir -p /var/lib/sandbox/tasks \
    && chown -R 65532:65532 /var/lib/sandbox
USER 65532:65532
EXPOSE 5758
# No HEALTHCHECK: the image has no HTTP client. Kubernetes probes the agent with
# httpGet on :5758 — /health for liveness, /readyz for readiness (see the chart).
# The container's first process is the init role, which runs the agent (its flags follow
# `--`, e.g. `docker run IMAGE --enable-sidecar-mode`) and restarts it if it dies, so an
# agent crash does not end the container and its tasks (docs/in-pod.md).
ENTRYPOINT ["task-executor", "init", "--"]
