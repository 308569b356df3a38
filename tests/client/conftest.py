"""The client tests use the router tests' three real session-speaking replicas and the
serving tests' tiny model."""

from tests.routing.conftest import replicas  # noqa: F401 - a fixture, shared
from tests.serving.conftest import tiny_model  # noqa: F401 - a fixture, shared
