# fedmq: two images from one file (docs/deploy.md):
#   site  what a site runs: every role (worker, aggregator, coordinator, keyholder, monitor,
#         history, replay), without the tools-only packages (TOOLS_ONLY: report plots, bundled
#         datasets for `fedmq partition`/`demo`)
#   full  (the default, last stage) site + those packages: `report`, `partition`, `demo` too
# The dependency stages (deps, tools-deps) see only pyproject.toml, none of fedmq's code or docs,
# so a code change rebuilds only the small last layers of both images.
#
#   docker build -t fedmq .                          # full
#   docker build --target site -t fedmq-site .       # what a remote site pulls
#   docker run --rm -e FEDMQ_BROKER_URL=amqps://site-3:...@broker.example:5671/%2F \
#       -v /srv/site-3:/data:ro fedmq-site worker --job J --site site-3 --data /data/train.npz
#
# Behind a registry, mirror or proxy of the site's own: every source is a build argument
#   --build-arg BASE_IMAGE=registry.example/python:3.11-slim-bookworm
#   --build-arg PIP_INDEX_URL=https://pypi.example/simple  (and PIP_EXTRA_INDEX_URL, PIP_FIND_LINKS,
#               PIP_TRUSTED_HOST; PIP_CERT = the CA bundle pip trusts, default the base's system one)
#   --build-arg TORCH_INDEX_URL=https://pypi.example/torch-cpu/simple
# HTTP(S)_PROXY/NO_PROXY are passed by docker and podman as usual. The entrypoint is `fedmq`; the
# command is the subcommand and its flags. Configuration comes from FEDMQ_* environment variables
# and a mounted job TOML.
ARG BASE_IMAGE=python:3.11-slim-bookworm
# Package sources (pip reads PIP_* from the environment; empty lists are ignored). Every stage
# that runs pip names them again: an ARG's value ends with its stage.
ARG PIP_INDEX_URL=https://pypi.org/simple
ARG PIP_EXTRA_INDEX_URL=
ARG PIP_FIND_LINKS=
ARG PIP_TRUSTED_HOST=
ARG PIP_CERT=/etc/ssl/certs/ca-certificates.crt
ARG PIP_RETRIES=5
ARG PIP_DEFAULT_TIMEOUT=15
# The torch wheels' index: CPU-only builds (an unpinned resolve would pull the multi-GB CUDA one).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

# ------------------------------------------------------------------- deps: what every role needs
FROM ${BASE_IMAGE} AS deps
ARG PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_FIND_LINKS PIP_TRUSTED_HOST PIP_CERT PIP_RETRIES PIP_DEFAULT_TIMEOUT
ARG TORCH_INDEX_URL

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Unprivileged user and group, both id 10001 (so files on volumes read 10001:10001 everywhere);
# the mount points exist, and /out (models, reports) and /state (a site's DP budget ledger) are
# writable, so named volumes mounted there inherit the ownership.
RUN groupadd --system --gid 10001 fedmq \
    && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/fedmq \
        --shell /usr/sbin/nologin fedmq \
    && mkdir -p /data /config /out /state \
    && chown 10001:10001 /out /state

# CPU-only torch, pinned inside pyproject's range (torch>=2.2,<2.15) and to the version the
# development venv runs (scripts/bootstrap.sh). Installed first and alone, so this layer stays
# cached while fedmq's code changes. What no role runs is dropped in the same layer (a later
# layer could not shrink the image): C++ headers (extension builds) and torch's own test binaries.
ARG TORCH_VERSION=2.13.0
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}" \
    && torch_dir="$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/torch" \
    && rm -rf "$torch_dir/include" "$torch_dir/test" \
    && find "$torch_dir/bin" -type f ! -name torch_shm_manager -delete

# pyproject's dependencies, split: the site's here, TOOLS_ONLY in tools-deps. scikit-learn stays
# with the site: federated evaluation computes AUC, F1 and R2 with it.
ARG TOOLS_ONLY="matplotlib mlxtend"
WORKDIR /opt/fedmq
COPY pyproject.toml ./
RUN python -c 'import re, sys, tomllib; \
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]; \
tools = set(sys.argv[1].lower().split()); \
name = lambda d: re.match(r"[A-Za-z0-9_.-]+", d).group(0).lower(); \
open("requirements-site.txt", "w").write("".join(d + "\n" for d in deps if name(d) not in tools)); \
open("requirements-tools.txt", "w").write("".join(d + "\n" for d in deps if name(d) in tools))' "${TOOLS_ONLY}" \
    && pip install -r requirements-site.txt

# One thread per role process: sites often share cores with other work.
ENV OMP_NUM_THREADS=1 \
    MKL_NUM_THREADS=1 \
    FEDMQ_METRICS_PORT=9100
EXPOSE 9100

# Alive = the role's /metrics answers (FEDMQ_METRICS_PORT); with metrics off, the broker answers.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-m", "fedmq.shared.metrics"]

ENTRYPOINT ["fedmq"]
CMD ["--help"]

# --------------------------------------------------------- tools-deps: + report and dataset tools
FROM deps AS tools-deps
ARG PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_FIND_LINKS PIP_TRUSTED_HOST PIP_CERT PIP_RETRIES PIP_DEFAULT_TIMEOUT
RUN pip install -r requirements-tools.txt

# ------------------------------------------------------------------------------------------ site
FROM deps AS site
ARG PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_FIND_LINKS PIP_TRUSTED_HOST PIP_CERT PIP_RETRIES PIP_DEFAULT_TIMEOUT
COPY README.md ./
COPY shared ./shared
COPY aggregator ./aggregator
COPY coordinator ./coordinator
COPY worker ./worker
COPY fedmq ./fedmq
RUN pip install --no-deps . && rm -rf /opt/fedmq/build && fedmq worker --help >/dev/null
USER 10001:10001
WORKDIR /home/fedmq

# ------------------------------------------------------------------ full (default): site + tools
FROM tools-deps AS full
ARG PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_FIND_LINKS PIP_TRUSTED_HOST PIP_CERT PIP_RETRIES PIP_DEFAULT_TIMEOUT
COPY --from=site /opt/fedmq /opt/fedmq
RUN pip install --no-deps /opt/fedmq && pip check && rm -rf /opt/fedmq/build
USER 10001:10001
WORKDIR /home/fedmq
