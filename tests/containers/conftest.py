"""Fixtures of the container tests: podman (or a skip saying why), a root filesystem, a CDI kind."""

from tests.support.containers import cdi_kind, podman  # noqa: F401
