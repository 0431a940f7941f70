"""The worker: runs generation jobs from the arq queue and publishes their tokens to Redis Streams."""
