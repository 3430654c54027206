# moat, the protective DNS resolver, as a container image.
#
#   docker build -t moat .
#   docker run -d --name moat -p 53:53/udp -p 53:53/tcp -p 127.0.0.1:9153:9153 \
#       -v moat-state:/var/lib/moat moat
#   dig @127.0.0.1 c2.moat.test          # the self-test: 0.0.0.0 (blocked as C2)
#
# Runs as the unprivileged user moat (uid 10053) and still answers on port 53: moat's own
# interpreter carries the file capability cap_net_bind_service (nothing else does). That needs
# the capability in the container's bounding set (Docker's and podman's default) and no
# `no-new-privileges` (with it the kernel ignores file capabilities: then listen on a port
# >= 1024 and publish it as 53, e.g. `-p 53:5353/udp`, as deploy/kubernetes does).
# Config: /etc/moat/moat.toml (mount your own directory over /etc/moat); state: the volume
# /var/lib/moat; verdict log: stdout; health: HEALTHCHECK on http://127.0.0.1:9153/healthz.

# ---- build: a virtualenv with moat and its dependencies (wheels from PyPI) ---------------------
FROM python:3.11-slim-bookworm AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY resolver ./resolver
COPY policy ./policy
# --copies: the venv gets its own interpreter binary (python3.11; python and python3 link to
# it), so the capability set below applies to moat's interpreter only, not to every python in
# the image. pip and setuptools are not needed at run time.
RUN python -m venv --copies /opt/moat \
 && /opt/moat/bin/pip install '.[fast]' \
 && /opt/moat/bin/pip uninstall -q -y pip setuptools \
 && ln -sf python3.11 /opt/moat/bin/python \
 && ln -sf python3.11 /opt/moat/bin/python3 \
 && /opt/moat/bin/moat --version

# ---- runtime -------------------------------------------------------------------------------
FROM python:3.11-slim-bookworm
LABEL org.opencontainers.image.title="moat" \
      org.opencontainers.image.description="Protective DNS resolver: sinkholes malware, phishing and C2 domains and shows which devices asked" \
      org.opencontainers.image.licenses="MIT"
RUN groupadd --gid 10053 moat \
 && useradd --no-log-init --uid 10053 --gid 10053 --home-dir /var/lib/moat --no-create-home \
        --shell /usr/sbin/nologin moat \
 && mkdir -p /etc/moat /var/lib/moat /run/moat \
 && chown moat:moat /var/lib/moat /run/moat
COPY --from=build /opt/moat /opt/moat
# cap_net_bind_service=+ep on the venv's interpreter (what `setcap` writes: a version-2
# security.capability xattr, permitted = effective = bit 10), without installing libcap2-bin.
RUN python3 -c "import glob, os, struct; ps = [p for p in glob.glob('/opt/moat/bin/python*') if not os.path.islink(p)]; assert ps; [os.setxattr(p, 'security.capability', struct.pack('<5I', 0x02000001, 1 << 10, 0, 0, 0)) for p in ps]" \
 && /opt/moat/bin/python -c "import ahocorasick, dnslib, numpy, uvloop, resolver.app, policy.build"
COPY deploy/docker/moat.toml /etc/moat/moat.toml
ENV PATH=/opt/moat/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    STATE_DIRECTORY=/var/lib/moat \
    RUNTIME_DIRECTORY=/run/moat \
    MOAT_HEALTH_URL=http://127.0.0.1:9153/healthz
USER 10053:10053
WORKDIR /var/lib/moat
VOLUME ["/var/lib/moat"]
EXPOSE 53/udp 53/tcp 9153/tcp
# 200 from /healthz: listening, and a policy is loaded. The system python (no capability), no
# proxy (a DNS container with http_proxy set must still ask itself).
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["/usr/local/bin/python3", "-c", "import os, urllib.request as u; u.build_opener(u.ProxyHandler({})).open(os.environ['MOAT_HEALTH_URL'], timeout=4)"]
# moat handles SIGTERM itself (stops accepting, finishes queries in flight, exits 0): no init.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/opt/moat/bin/moat", "serve"]
CMD ["--config", "/etc/moat/moat.toml", "--query-log", "-"]
