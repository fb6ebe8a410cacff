"""Mistral (7B v0.1-v0.3, Mistral-Nemo): HF names <-> Megatron GPTModel names.

The HF layout is Llama's (no biases; head_dim may differ from hidden / heads, e.g. Mistral-Nemo's
128 with hidden 5120 and 32 heads), so the table is Llama's. What differs is `sliding_window`:
Megatron's attention here has none, so arch.check_sequence_length refuses any sequence longer
than the window (a v0.1 checkpoint: 4096); later releases set no window.
"""

from megatron_lead.policy.convert.llama import TABLE  # noqa: F401 - the family's table
