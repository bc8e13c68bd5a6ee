"""Custom block kinds of this file (filled in by the method that produces them)."""

KINDS: dict = {}
