"""Release checks: accuracy replay, load generation, statistics."""
