"""pytest -m quick: the chat's own behaviour in about 20 seconds (the app on SQLite, in-process)."""

import pytest


def pytest_collection_modifyitems(items):
    """Quick: a test of the app through Starlette's TestClient on SQLite, with no real server,
    browser or PostgreSQL. The full suite runs them all, and the rest."""
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if "client" in item.fixturenames and params.get("database_url") == "sqlite":
            item.add_marker(pytest.mark.quick)
