from tests.helpers.provider import fresh_server, host, server, tiny_repo  # noqa: F401  (pytest fixtures)
