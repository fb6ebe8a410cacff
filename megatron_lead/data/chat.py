"""Problem text -> prompt token ids, the way the policy will see them at rollout time.

The prompt is `problem + instruction` (the paper's suffix by default) put through the
tokenizer's chat template with the assistant turn opened, so rollouts start right where the
model's answer does. Prompts longer than `max_prompt_len` tokens are dropped, not truncated:
a truncated math problem is a different problem with a wrong reference answer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from .datasets import DataStats, PromptRecord

DEFAULT_INSTRUCTION = " Let's think step by step and output the final answer within \\boxed{}."
"""The paper's instruction suffix, appended to every problem (note the leading space)."""


class PromptEncoder:
    """Templates and tokenises prompts, and decodes responses for the grader.

    tokenizer_path: a local folder with the tokenizer files (no hub download: every rank of
        a job must read the very same files).
    instruction: appended verbatim to each problem before templating.
    use_chat_template: wrap the text as one user turn of the tokenizer's chat template, with
        add_generation_prompt=True. A tokenizer without a chat template (a base model's) falls
        back to the plain text `problem + instruction`, with the tokenizer's own special tokens
        (e.g. a BOS) added as for any plain text; this is deliberate, not an error, so the same
        config runs base and instruct models. `uses_chat_template` says which one is in use.
    max_prompt_len: longest prompt kept, in tokens after templating.
    """

    def __init__(self, tokenizer_path: str, instruction: str = DEFAULT_INSTRUCTION,
                 use_chat_template: bool = True, max_prompt_len: int = 1024):
        if not isinstance(max_prompt_len, int) or max_prompt_len < 1:
            raise ValueError(f"max_prompt_len={max_prompt_len!r} must be a positive integer")
        if not Path(tokenizer_path).is_dir():
            raise FileNotFoundError(f"tokenizer_path {tokenizer_path} is not a local folder")
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_path), local_files_only=True)
        self.instruction = instruction
        self.max_prompt_len = max_prompt_len
        self.uses_chat_template = bool(use_chat_template and self.tokenizer.chat_template)

    def prompt_text(self, problem: str) -> str:
        """The full prompt string for one problem (what `encode` tokenises)."""
        text = problem + self.instruction
        if not self.uses_chat_template:
            return text
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)

    def encode(self, records: Sequence[PromptRecord], stats: DataStats | None = None
               ) -> tuple[list[PromptRecord], list[list[int]]]:
        """(kept records, their prompt token ids), in input order; prompts longer than
        `max_prompt_len` tokens are left out and counted in `stats.dropped_too_long`."""
        records = list(records)
        if not records:
            return [], []
        texts = [self.prompt_text(r.problem) for r in records]
        # A chat template writes its own BOS/markers; adding special tokens again would double
        # them. Plain text gets them as the tokenizer would give any text.
        ids = self.tokenizer(texts, add_special_tokens=not self.uses_chat_template)["input_ids"]
        kept = [i for i, x in enumerate(ids) if len(x) <= self.max_prompt_len]
        if stats is not None:
            stats.dropped_too_long += len(records) - len(kept)
        return [records[i] for i in kept], [list(ids[i]) for i in kept]

    def decode(self, ids: Sequence[int]) -> str:
        """A response's text for grading: special tokens (EOS, padding, template markers) removed."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    @property
    def eos_token_id(self) -> int | None:
        return self.tokenizer.eos_token_id

    @property
    def pad_token_id(self) -> int | None:
        """The tokenizer's pad id, else its EOS id (many causal LMs define no pad token; padded
        positions are masked out anyway, so any valid id will do)."""
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else self.tokenizer.eos_token_id
