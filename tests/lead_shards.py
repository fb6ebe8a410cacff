"""Building a `RolloutShard` from per-prompt (lengths, correct) lists, for the LEAD tests."""

from megatron_lead.lead import RolloutShard


def shard_of(prompts):
    """prompts: list of (lengths, correct) -> one shard holding the whole batch."""
    idx, ls, cs = [], [], []
    for q, (lengths, correct) in enumerate(prompts):
        idx += [q] * len(lengths)
        ls += list(lengths)
        cs += [float(c) for c in correct]
    return RolloutShard(prompt_index=idx, length=ls, score=cs, num_prompts=len(prompts))
