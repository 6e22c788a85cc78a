"""Idempotency tests."""
