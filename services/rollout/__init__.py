"""Rollout workers: generate samples with the current policy, score them, push trajectories.

`services.rollout.backend` is the small generation interface; `backend_hf` implements it on
transformers (imports torch lazily, when a backend is built).
"""
