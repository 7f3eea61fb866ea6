"""Model builders (the tiny models used by tests and the demo)."""
