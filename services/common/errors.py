"""Errors meant for a person: the CLI prints them as one line, services map them to 4xx / gRPC codes."""


class UserError(Exception):
    """Bad input or configuration that the user can fix (message is one line, no traceback)."""
