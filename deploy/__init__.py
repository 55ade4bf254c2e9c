"""Headless edge deployment: HTTP service, watched folder, audit log."""
