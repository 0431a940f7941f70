"""The ``fanline`` command: up, api, worker, chat, watch."""
