# SuperLink side: flower-superlink, which also runs the ServerApp (subprocess isolation),
# so the project and its dependencies are installed here too.
# BASE_IMAGE: the official Flower image of the pinned flwr version by default; offline,
# a local base built by docker/build_base.sh (see the README's docker-compose demo).
ARG BASE_IMAGE=flwr/serverapp:1.41.0
FROM ${BASE_IMAGE}
USER root
# Everything installs from the wheelhouse made on the host (docker/make_wheelhouse.sh):
# no network access during the build.
COPY docker/wheels /tmp/wheels
RUN python3 -m venv /opt/kta \
    && /opt/kta/bin/pip install --no-cache-dir --no-index --find-links /tmp/wheels kta-flwr \
    && rm -rf /tmp/wheels
ENV PATH=/opt/kta/bin:$PATH \
    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 \
    PYTHONUNBUFFERED=1
WORKDIR /app
ENTRYPOINT ["flower-superlink"]
