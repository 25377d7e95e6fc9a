"""Offline metrics and the blessing that a candidate must earn before any release."""
