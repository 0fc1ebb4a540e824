"""The zoo tests use the session's tiny zoo (`tiny_zoo` in tests/conftest.py)."""
