"""The real redis-server fixtures of the storage tests, for the codec stage's tier tests."""

from tests.storage.conftest import redis_server  # noqa: F401
