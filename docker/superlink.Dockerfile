# SuperLink side: flower-superlink, which also runs the ServerApp (subprocess isolation),
# so the project and its dependencies are installed here too.
# BASE_IMAGE: the official Flower image of the pinned flwr version by default; offline,
# a local base built by docker/build_base.sh (see docs/running.md, docker-compose demo).
ARG BASE_IMAGE=flwr/serverapp:1.41.0

# Everything installs from the wheelhouse made on the host (docker/make_wheelhouse.sh),
# without network access, in a first stage: the wheelhouse never becomes a layer.
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
ENTRYPOINT ["flower-superlink"]
