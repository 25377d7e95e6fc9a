"""The trainer CLI (runs in a pod or as a local process) and the model it trains."""
