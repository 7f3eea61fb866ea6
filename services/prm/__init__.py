"""PRM inference service. Import `services.prm.client` to talk to it (no torch import)."""
