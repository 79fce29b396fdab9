# syntax=docker/dockerfile:1
# Turnout: a slim two-stage image. The build stage makes a wheel (the same `pip wheel` that
# tests/test_container.py runs); the runtime stage installs it as a non-root user.
#
#   docker build -t turnout .
#   docker run -p 8080:8080 -p 8081:8081 -e TURNOUT_ADMIN_TOKEN=change-me \
#     -v turnout-state:/var/lib/turnout \
#     -v "$PWD/routing.yaml:/etc/turnout/routing.yaml:ro" turnout
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY flags ./flags
COPY stores ./stores
COPY edge ./edge
COPY admin ./admin
COPY turnout ./turnout
RUN python -m pip install --no-cache-dir --upgrade pip \
 && python -m pip wheel --no-cache-dir --no-deps --wheel-dir /wheels . \
 && python -m pip wheel --no-cache-dir --wheel-dir /wheels /wheels/turnout-*.whl

FROM python:3.11-slim
RUN useradd --system --create-home --uid 10001 turnout \
 && mkdir -p /var/lib/turnout /etc/turnout \
 && chown turnout /var/lib/turnout
COPY --from=build /wheels /wheels
RUN python -m pip install --no-cache-dir --no-index --find-links /wheels turnout \
 && rm -rf /wheels
COPY examples/settings.yaml examples/routing.yaml /etc/turnout/
USER turnout
WORKDIR /home/turnout
# The admin API listens on all interfaces so `-p 8081:8081` reaches it; it then needs a token:
# pass TURNOUT_ADMIN_TOKEN (turnout refuses to start without one, naming the variable).
ENV TURNOUT_CONFIG=/etc/turnout/settings.yaml \
    TURNOUT_STATE_DIR=/var/lib/turnout \
    TURNOUT_EDGE_HOST=0.0.0.0 \
    TURNOUT_ADMIN_HOST=0.0.0.0 \
    PYTHONUNBUFFERED=1
# The version history, the bootstrap copy and generated secrets: keep them across re-creates.
VOLUME ["/var/lib/turnout"]
EXPOSE 8080 8081
# Healthy means ready: a configuration (from the store or the bootstrap copy) is served.
HEALTHCHECK --interval=10s --timeout=2s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8081/readyz', timeout=2).status == 200 else 1)"]
ENTRYPOINT ["turnout"]
CMD ["serve"]
