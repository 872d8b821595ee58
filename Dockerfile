# syntax=docker/dockerfile:1
# Multi-stage: build a wheel with its dependencies, then a slim non-root runtime.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY gateway ./gateway
COPY ca ./ca
RUN pip wheel --no-cache-dir -c constraints.txt --wheel-dir /wheels ".[postgres]"

FROM python:3.11-slim
RUN useradd --system --uid 10001 --home-dir /var/lib/gateway --create-home gateway
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
WORKDIR /var/lib/gateway
ENV GATEWAY_PATHS__DATA_DIR=/var/lib/gateway/data \
    GATEWAY_PATHS__CERTS_DIR=/var/lib/gateway/certs \
    GATEWAY_MQTT__HOST=0.0.0.0 \
    GATEWAY_API__HOST=0.0.0.0 \
    GATEWAY_API__URL=https://127.0.0.1:8443 \
    GATEWAY_LOGGING__FORMAT=json
RUN mkdir -p data certs && chown -R gateway:gateway /var/lib/gateway && chmod 0700 data certs
USER gateway
VOLUME ["/var/lib/gateway/data", "/var/lib/gateway/certs"]
EXPOSE 8883 8443
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
  CMD python -c "import ssl,sys,urllib.request as u; c=ssl.create_default_context(cafile='/var/lib/gateway/certs/ca.crt'); sys.exit(0 if u.urlopen('https://127.0.0.1:8443/healthz', context=c, timeout=4).status == 200 else 1)"
ENTRYPOINT ["gateway"]
CMD ["serve"]
