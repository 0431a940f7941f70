"""The API pod: HTTP/WebSocket endpoints and the per-pod fan-out hub."""
