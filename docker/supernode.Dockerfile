# SuperNode side: flower-supernode, which runs the ClientApp (subprocess isolation) with
# torch. The pinned torch wheel from the host's wheelhouse is the CUDA build, so the same
# image trains on GPU edge nodes (compose.gpu.yml reserves the GPU); pass a CPU-only
# wheelhouse for smaller CPU images.
# BASE_IMAGE: the official Flower image of the pinned flwr version by default; offline,
# a local base built by docker/build_base.sh (see the README's docker-compose demo).
ARG BASE_IMAGE=flwr/clientapp:1.41.0
FROM ${BASE_IMAGE}
USER root
COPY docker/wheels /tmp/wheels
RUN python3 -m venv /opt/kta \
    && /opt/kta/bin/pip install --no-cache-dir --no-index --find-links /tmp/wheels kta-flwr \
    && rm -rf /tmp/wheels
ENV PATH=/opt/kta/bin:$PATH \
    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 \
    PYTHONUNBUFFERED=1
WORKDIR /app
ENTRYPOINT ["flower-supernode"]
