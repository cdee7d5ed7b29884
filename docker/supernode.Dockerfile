# SuperNode side: flower-supernode, which runs the ClientApp (subprocess isolation) with
# torch. What torch: the wheelhouse's (docker/make_wheelhouse.sh): `--cpu` for slim CPU
# images, the default for the pinned CUDA build, so the same image trains on GPU edge
# nodes (compose.gpu.yml reserves the GPU).
# BASE_IMAGE: the official Flower image of the pinned flwr version by default; offline,
# a local base built by docker/build_base.sh (see docs/running.md, docker-compose demo).
ARG BASE_IMAGE=flwr/clientapp:1.41.0

# Install in a first stage, so that the wheelhouse never becomes a layer of the image.
FROM ${BASE_IMAGE} AS install
USER root
COPY docker/wheels /tmp/wheels
COPY docker/install.sh /tmp/install.sh
RUN sh /tmp/install.sh

FROM ${BASE_IMAGE}
USER root
COPY --from=install /opt/kta /opt/kta
ENV PATH=/opt/kta/bin:$PATH \
    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 \
    PYTHONUNBUFFERED=1
WORKDIR /app
ENTRYPOINT ["flower-supernode"]
