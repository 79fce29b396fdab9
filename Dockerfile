# syntax=docker/dockerfile:1
# Turnout: a slim two-stage image. The build stage makes a wheel (the same `pip install`
# the README's scripts run); the runtime stage installs it as a non-root user.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY flags ./flags
COPY stores ./stores
COPY edge ./edge
COPY admin ./admin
COPY turnout ./turnout
RUN python -m pip install --no-cache-dir --upgrade pip \
 && python -m pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
RUN useradd --system --create-home --uid 10001 turnout
COPY --from=build /wheels /wheels
RUN python -m pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER turnout
WORKDIR /home/turnout
ENV TURNOUT_STATE_DIR=/home/turnout/state \
    TURNOUT_EDGE_HOST=0.0.0.0 \
    TURNOUT_ADMIN_HOST=127.0.0.1
EXPOSE 8080 8081
# /healthz lives on the admin listener (loopback inside the container by default).
HEALTHCHECK --interval=10s --timeout=2s --retries=3 \
  CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8081/healthz', timeout=2).status == 200 else 1)"
ENTRYPOINT ["turnout"]
CMD ["serve"]
