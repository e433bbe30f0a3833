# A stand-in for python:3.11-slim where no container registry answers: Debian bookworm's python3.11 (made with
# debootstrap and `docker import` as flm/debian-local:bookworm, with this host's CA certificates added:
# benchmarks/compose_check.py) in a venv that is first
# on PATH, so the project's Dockerfile finds `python` and pip as in the official image.
FROM flm/debian-local:bookworm
RUN python3 -m venv /opt/python
# the system's CA bundle (with the host's own CAs, which compose_check.py copies in) for pip and Python, as on the host
ENV PATH=/opt/python/bin:$PATH LANG=C.UTF-8 PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt REQUESTS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt
