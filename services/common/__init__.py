"""Shared pieces: settings, logging, auth, gRPC/HTTP bootstrap, and the one definition of a line."""
