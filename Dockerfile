# sirius-offload, CPU image:
#   docker build -t sirius-offload .
#   docker run --rm -p 8080:8080 -v sirius-models:/models sirius-offload
# serves SmolLM2-135M (fetched into the /models volume on first start) on port 8080; give
# other arguments to run something else (`... sirius-offload serve -m qwen2.5-coder-1.5b ...`).
#
# CUDA variant (cudarc loads libcuda and NVRTC at run time; run with `--gpus all`):
#   docker build -t sirius-offload:cuda --build-arg FEATURES=cuda \
#       --build-arg RUNTIME=nvidia/cuda:13.0.0-runtime-ubuntu24.04 .

ARG RUNTIME=debian:bookworm-slim

FROM rust:1.89-bookworm AS build
ARG FEATURES=""
WORKDIR /src
COPY . .
RUN cargo build --release --locked ${FEATURES:+--features ${FEATURES}} \
    && cp target/release/sirius-offload /sirius-offload

FROM ${RUNTIME}
# Python runs tools/fetch-model, which downloads a preset's weights with pip and converts them.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-pip ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /sirius-offload /usr/local/bin/sirius-offload
COPY configs /opt/sirius-offload/configs
COPY tools/fetch-model tools/convert_gguf.py tools/requirements.txt /opt/sirius-offload/tools/
RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir -r /opt/sirius-offload/tools/requirements.txt
ENV PATH=/opt/venv/bin:$PATH \
    SIRIUS_HOME=/models \
    SIRIUS_FETCH_TOOL=/opt/sirius-offload/tools/fetch-model
VOLUME /models
EXPOSE 8080
# Ready once the model is loaded (the first start also fetches it).
HEALTHCHECK --interval=10s --start-period=300s \
    CMD python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/health')"
ENTRYPOINT ["sirius-offload"]
CMD ["serve", "-m", "smollm2-135m", "--host", "0.0.0.0", "--port", "8080"]
