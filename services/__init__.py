"""psgpo services: PRM inference, code sandbox, rollout workers (imports nothing heavy)."""
