"""The client tests use the router tests' three real session-speaking replicas."""

from tests.routing.conftest import replicas  # noqa: F401 - a fixture, shared
