"""Writes examples/replay/rollouts.jsonl: a synthetic rollout log in the replay tool's format.

Not real training data: 40 steps of 32 prompts x 8 rollouts whose difficulty varies per prompt,
whose accuracy slowly rises and whose lengths slowly fall, with wrong rollouts longer than right
ones (as in reasoning models). Deterministic; rerun to regenerate the bundled file.
"""

import json
import random
import sys
from pathlib import Path


def main(out: Path, steps: int = 40, prompts: int = 32, group: int = 8, seed: int = 0) -> None:
    rng = random.Random(seed)
    pool = [(f"q{i:04d}", rng.uniform(0.05, 0.95), rng.uniform(800, 6000)) for i in range(4 * prompts)]
    with open(out, "w") as f:
        for step in range(steps):
            progress = step / max(steps - 1, 1)
            batch = []
            for pid, p_ok, base_len in rng.sample(pool, prompts):
                p = min(0.98, p_ok + 0.15 * progress)
                lengths, correct = [], []
                for _ in range(group):
                    ok = rng.random() < p
                    mean = base_len * (1.0 - 0.3 * progress) * (1.0 if ok else 1.4)
                    lengths.append(max(1, min(8000, int(rng.lognormvariate(0, 0.25) * mean))))
                    correct.append(int(ok and lengths[-1] < 8000))  # truncated = wrong
                batch.append({"id": pid, "lengths": lengths, "correct": correct})
            f.write(json.dumps({"step": step, "prompts": batch}) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("examples/replay/rollouts.jsonl"))
