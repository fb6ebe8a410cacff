"""The trainer's data phase: prompts from a file (`datasets`), templated and tokenised
(`chat`), and handed out in seeded, resumable global batches (`sampler`)."""

from .chat import DEFAULT_INSTRUCTION, PromptEncoder
from .datasets import DataStats, PromptRecord, load_prompts
from .sampler import PromptSampler, epoch_permutation, spread

__all__ = ["DEFAULT_INSTRUCTION", "DataStats", "PromptEncoder", "PromptRecord", "PromptSampler",
           "epoch_permutation", "load_prompts", "spread"]
