"""Benchmarks `megatron-lead eval` knows by name, and how a `--benchmark` argument becomes one.

A benchmark is a prompt file (JSONL or Parquet, the trainer's format: `problem` or `prompt`,
`answer`, optional `id` and `level`; data/datasets.py reads it) plus how to prompt and sample it.
The paper's five (LEAD_SPEC section 9: temperature 0.8, top-p 0.9, n = 3 for MATH-500 and
OlympiadBench, n = 10 for AIME24/25 and AMC23) are brought by the user (docs/EVAL.md says where
each comes from and how to convert it); the built-in task's held-out split ships with the repo.

    --benchmark math500                  preset, file <data-dir>/math500.jsonl (or .parquet)
    --benchmark math500=/data/m500.pq    preset, this file
    --benchmark /data/mine.jsonl         no preset: named after the file, default sampling
    --benchmark mine=/data/mine.jsonl    the same, named "mine"
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

from megatron_lead.data.chat import DEFAULT_INSTRUCTION


@dataclass(frozen=True)
class Benchmark:
    """One benchmark: its file and the prompting and sampling of its evaluation."""

    name: str
    """Name in tables, plots and file names."""
    path: str = ""
    """Prompt file (JSONL or Parquet)."""
    n: int = 1
    """Samples per problem; accuracy and lengths are means over all samples."""
    temperature: float = 0.8
    """Sampling temperature (0: greedy; then n must be 1)."""
    top_p: float = 0.9
    """Nucleus sampling."""
    max_len: int = 8000
    """Response tokens at most; longer responses are cut and counted as truncated."""
    instruction: str = DEFAULT_INSTRUCTION
    """Appended to every problem (the paper's boxed-answer suffix)."""
    use_chat_template: bool = True
    """Wrap the prompt in the tokenizer's chat template (plain text if it has none)."""
    max_prompt_len: int = 2048
    """Prompts longer than this (tokens) are left out and counted as `dropped` in the results."""
    source: str = ""
    """Where the file comes from (docs/EVAL.md has the details)."""

    def settings(self) -> dict:
        """What makes two evaluations of a model on this benchmark the same evaluation."""
        return {"path": os.path.abspath(self.path), "n": self.n, "temperature": self.temperature,
                "top_p": self.top_p, "max_len": self.max_len, "instruction": self.instruction,
                "use_chat_template": self.use_chat_template, "max_prompt_len": self.max_prompt_len}


# The paper's sampling; max_len 8000 is the training maximum (the paper does not state its eval cap).
_PAPER = dict(temperature=0.8, top_p=0.9, max_len=8000)
ARITH_HELDOUT = os.path.join("examples", "arith", "heldout.jsonl")
SHORTCUTS_HELDOUT = os.path.join("examples", "arith_shortcuts", "heldout.jsonl")

PRESETS: dict[str, Benchmark] = {
    "math500": Benchmark("math500", n=3, **_PAPER, source="HuggingFaceH4/MATH-500 (test split, 500 problems)"),
    "olympiadbench": Benchmark("olympiadbench", n=3, **_PAPER,
                               source="Hothan/OlympiadBench, OE_TO_maths_en_COMP (674 problems)"),
    "aime24": Benchmark("aime24", n=10, **_PAPER, source="HuggingFaceH4/aime_2024 (30 problems)"),
    "aime25": Benchmark("aime25", n=10, **_PAPER, source="opencompass/AIME2025, parts I and II (30 problems)"),
    "amc23": Benchmark("amc23", n=10, **_PAPER, source="math-ai/amc23 (40 problems)"),
    # The built-in task's fixed held-out split, scored as the demo scores it: greedy, the plain
    # "Q: ...\nA: " prompt it was trained on, 400 tokens (longer than any worked solution).
    "arith": Benchmark("arith", path=ARITH_HELDOUT, n=1, temperature=0.0, top_p=1.0, max_len=400,
                       instruction="", use_chat_template=False, max_prompt_len=64,
                       source="megatron_lead/data/arith.py, examples/arith/heldout.jsonl (533 problems, levels 1-6)"),
    # The second built-in task (issue 18), scored the same way; compare samples it (--n, --temperature).
    "arith_shortcuts": Benchmark("arith_shortcuts", path=SHORTCUTS_HELDOUT, n=1, temperature=0.0, top_p=1.0,
                                 max_len=400, instruction="", use_chat_template=False, max_prompt_len=64,
                                 source="megatron_lead/data/arith_shortcuts.py, examples/arith_shortcuts/"
                                        "heldout.jsonl (533 problems, levels 1-6)"),
}


def _find_file(data_dir: str, name: str) -> str:
    for suffix in (".jsonl", ".parquet", ".json"):
        path = os.path.join(data_dir, name + suffix)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"benchmark {name}: no {name}.jsonl or {name}.parquet in --data-dir {data_dir} "
                            f"(give the file as {name}=PATH; docs/EVAL.md says where to get it)")


def resolve(spec: str, data_dir: str = "data/benchmarks", n: int | None = None,
            temperature: float | None = None, top_p: float | None = None,
            max_len: int | None = None) -> Benchmark:
    """A `--benchmark` argument (see the module docstring) with the command's overrides applied."""
    name, sep, path = spec.partition("=")
    if not sep and (os.sep in spec or spec.endswith((".jsonl", ".json", ".parquet", ".pq"))):
        name, path = os.path.splitext(os.path.basename(spec))[0], spec
    name = name.strip()
    if not name or any(c in name for c in "/\\ "):
        raise ValueError(f"--benchmark {spec!r}: a benchmark name may not be empty or hold / or spaces")
    bench = PRESETS.get(name.lower(), Benchmark(name))
    bench = replace(bench, name=name)
    if path:
        bench = replace(bench, path=path)
    elif not bench.path:
        bench = replace(bench, path=_find_file(data_dir, name.lower() if name.lower() in PRESETS else name))
    if not os.path.isfile(bench.path):
        raise FileNotFoundError(f"benchmark {name}: {bench.path} does not exist")
    over = {k: v for k, v in dict(n=n, temperature=temperature, top_p=top_p, max_len=max_len).items()
            if v is not None}
    bench = replace(bench, **over)
    if bench.n < 1 or bench.max_len < 1 or bench.temperature < 0 or not 0 < bench.top_p <= 1:
        raise ValueError(f"benchmark {name}: need n >= 1, max_len >= 1, temperature >= 0, 0 < top_p <= 1")
    if bench.temperature == 0 and bench.n > 1:
        raise ValueError(f"benchmark {name}: greedy decoding (temperature 0) gives n={bench.n} identical samples")
    return bench
