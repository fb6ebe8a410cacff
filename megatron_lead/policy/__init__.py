"""The policy on Megatron-Core: parallel groups, model, forward, conversion (heavy imports inside)."""
