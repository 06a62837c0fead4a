"""Checked-in operator-support tables (JSON) for providers that cannot be installed here; see build.py."""
