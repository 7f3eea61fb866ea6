"""Code sandbox service. Import `services.sandbox.client` to talk to it (no torch, no heavy imports)."""
