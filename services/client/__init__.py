"""The public face of psgpo for code outside this repository (imports nothing on its own).

- `services.client.sdk`: `PsgpoRun`, a thin SDK over the Redis protocol (docs/redis.md) for an
  external trainer: enqueue tasks, iterate scored trajectories with explicit acknowledgement,
  publish policy weights.
- `services.client.adapters`: reward functions for other RL frameworks that call the sandbox and
  PRM services over HTTP: verl (`compute_score`), TRL (`make_trl_reward`) and a probe of the
  OpenRLHF remote reward URL (`check_openrlhf_reward_url`).
- `services.client.testspec`: the test shapes both accept (MBPP asserts, HumanEval, stdio, call).

Neither module imports torch; docs/clients.md has copy-paste snippets.
"""
