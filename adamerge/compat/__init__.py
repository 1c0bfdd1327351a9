"""Workarounds for broken third-party installs; each is a no-op where the install is healthy."""
