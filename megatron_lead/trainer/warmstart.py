"""The warm start that `demo` and `compare` share: the built-in task's data, tokenizer and model
config, and the SFT settings that train a small Qwen2 on the verbose worked solutions.

It lives here, below `eval/` and `demo.py`, so that both import it downwards (compare used to take
it from demo.py, the one import that pointed up).
"""

from __future__ import annotations

import json
import os

# About 7 CPU-minutes of packed SFT on the 2-core machine (settings compared in docs/RESULTS.md,
# items 4, 9 and 10: fewer steps, padded or length-bucketed batches solve far less).
SFT_SETTINGS = dict(steps=1200, batch_size=32, micro_batch_size=32, lr=5e-3, warmup_steps=20, seed=0,
                    pack_max_tokens=8192)


def prepare(warm: str, sft_steps: int):
    """Task data, tokenizer, model config and the SFT settings; returns (SFTConfig, data paths)."""
    from megatron_lead.data import arith
    from megatron_lead.trainer.sft import SFTConfig

    paths = arith.write_splits(os.path.join(warm, "data"))
    arith.save_task_tokenizer(os.path.join(warm, "tokenizer"))
    config_path = os.path.join(warm, "config.json")
    with open(config_path, "w") as f:
        json.dump(arith.qwen2_config(), f, indent=2)
    sft = SFTConfig(data=paths["train"], tokenizer=os.path.join(warm, "tokenizer"), out=os.path.join(warm, "model"),
                    model_config=config_path, **{**SFT_SETTINGS, "steps": sft_steps,
                                                 "warmup_steps": min(SFT_SETTINGS["warmup_steps"], sft_steps // 10)})
    return sft, paths
