"""The RL trainer: the training loop's phases (rollout, advantages, update, checkpoint)."""
