"""Example generator plugins, loaded by real workers in tests/worker/test_plugins.py."""
