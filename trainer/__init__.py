"""psgpo trainer: SFT, PPO (RLTF / PSGPO), prefix labelling, PRM training."""
