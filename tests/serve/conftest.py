from tests.serve.fixtures import fresh_server, host, server, tiny_repo  # noqa: F401  (pytest fixtures)
