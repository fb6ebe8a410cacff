"""Rollouts with vLLM (`engine`) and the Megatron -> vLLM weight sync (`sync`)."""
