# fedmq: one image for every role (coordinator, aggregator, worker, monitor, report, ...).
#   docker build -t fedmq .
#   docker run --rm fedmq --help
#   docker run --rm -e FEDMQ_BROKER_URL=amqps://site-3:...@broker.example:5671/%2F \
#       -v /srv/site-3:/data:ro fedmq worker --job J --site site-3 --data /data/train.npz
# The entrypoint is `fedmq`; the command is the subcommand and its flags. Configuration comes from
# FEDMQ_* environment variables and a mounted job TOML (docs/deploy.md).
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# CPU-only torch, pinned inside pyproject's range (torch>=2.2,<2.15) and to the version the
# development venv runs (scripts/bootstrap.sh). Installed first and alone: an unpinned resolve
# would pull the multi-GB CUDA build, and this layer stays cached while fedmq's code changes.
ARG TORCH_VERSION=2.13.0
RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch==${TORCH_VERSION}"

WORKDIR /opt/fedmq
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY aggregator ./aggregator
COPY coordinator ./coordinator
COPY worker ./worker
COPY fedmq ./fedmq
RUN pip install . && rm -rf /opt/fedmq/build

# Unprivileged user; the mount points exist, and /out (models, reports) and /state (a site's DP
# budget ledger) are writable, so named volumes mounted there inherit the ownership.
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/fedmq fedmq \
    && mkdir -p /data /config /out /state \
    && chown fedmq:fedmq /out /state
USER 10001:10001
WORKDIR /home/fedmq

# One thread per role process: sites often share cores with other work.
ENV OMP_NUM_THREADS=1 \
    MKL_NUM_THREADS=1 \
    FEDMQ_METRICS_PORT=9100
EXPOSE 9100

# Alive = the role's /metrics answers (FEDMQ_METRICS_PORT); with metrics off, the broker answers.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-m", "shared.metrics"]

ENTRYPOINT ["fedmq"]
CMD ["--help"]
