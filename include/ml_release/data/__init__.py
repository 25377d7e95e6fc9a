"""Dataset loading, deterministic splitting and fingerprints."""
