"""The rollout engine: vLLM generating G completions per prompt, token ids in, tokens + log-probs out.

vLLM runs in this process ("colocate", the one placement; vLLM's TP size is its own, not
Megatron's TP x PP). Inside a trainer rank (a torch.distributed default group exists) vLLM starts
with its `external_launcher` executor, which reuses the trainer's group (a process has only one
default group): every trainer rank builds an engine at the same time (the start is collective)
and vLLM's TP groups are carved out of consecutive trainer ranks, so world / vLLM-TP replicas
generate side by side, each from its own slice of the prompts. Weights arrive in-process
(`sync.reload`). On GPUs each rank's worker shares its GPU with Megatron and sleeps at level 2
during training (`sleep()`): the next sync overwrites every weight, so there is nothing to keep;
`wake_up(["weights"])`, the sync, then `wake_up(["kv_cache"])` bring it back.

vLLM's V1 model runner is pinned (`VLLM_USE_V2_MODEL_RUNNER=0`): on CPU vLLM has no other, so it
is the runner every test exercised, and on CUDA vLLM would pick V2 (docs/GPU.md has the reasons).

Log-probs are vLLM's "processed" ones: of logits / temperature (after top-p), i.e. the
distribution the tokens were sampled from; `policy.logprobs` recomputes the same quantity
(exactly so with top_p = 1; a top-p < 1 renormalises vLLM's over the nucleus).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch

PLACEMENTS = ("colocate",)

# vLLM's import sets it to 1 for the whole process (vllm/env_override.py), and its CPU platform
# again at engine start; Inductor reads it once, when torch._inductor.config is first imported.
_COMPILE_THREADS = "TORCHINDUCTOR_COMPILE_THREADS"


@dataclass
class EngineConfig:
    model_path: str                      # HF-format folder (config.json + weights) of the run's policy
    tensor_parallel_size: int = 1        # vLLM's own TP, independent of Megatron's TP x PP
    placement: str = "colocate"         # the only one: vLLM inside each trainer rank
    dtype: str = "auto"                  # "float32" for exact comparisons on CPU
    max_model_len: int = 4096            # prompt + response tokens
    gpu_memory_utilization: float = 0.5  # on CPU vLLM reads this as a fraction of host RAM
    kv_cache_memory_bytes: int | None = None  # explicit KV-cache size; overrides the fraction
    enforce_eager: bool = False
    seed: int = 0


@dataclass
class SamplingConfig:
    n: int = 1                           # G: completions per prompt
    temperature: float = 1.0
    top_p: float = 1.0
    max_response_len: int = 1024
    stop_token_ids: tuple[int, ...] = ()  # besides the model's EOS ids
    seed: int | None = None              # prompt i uses seed + i, unless generate() gets seeds


@dataclass
class Rollout:
    prompt_index: int                    # position of its prompt in the generate() call
    prompt_ids: list[int]
    response_ids: list[int]
    logprobs: list[float]                # one per response token, of the sampling distribution
    finish_reason: str                   # "stop" (stop/EOS token, included in response_ids) | "length"

    @property
    def truncated(self) -> bool:
        """Cut off at max_response_len (or max_model_len): no final answer to grade as correct."""
        return self.finish_reason == "length"


def on_cpu() -> bool:
    return not torch.cuda.is_available()


def eos_token_ids(model_path: str | Path) -> list[int]:
    """EOS ids from generation_config.json, else config.json (vLLM runs without a tokenizer here)."""
    for name in ("generation_config.json", "config.json"):
        path = Path(model_path) / name
        if path.is_file():
            eos = json.loads(path.read_text()).get("eos_token_id")
            if eos is not None:
                return [eos] if isinstance(eos, int) else list(eos)
    return []


def check_model_files(model_path: str | Path) -> None:
    path = Path(model_path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no HF model at {path}: config.json is missing")
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise FileNotFoundError(f"no weights (*.safetensors / *.bin) in {path}")


@contextlib.contextmanager
def _keep_inductor_compile_threads() -> Iterator[None]:
    """Undo vLLM's process-wide TORCHINDUCTOR_COMPILE_THREADS=1 once vLLM is imported and started.

    vLLM wants single-threaded Inductor compiles in its own (daemonic) worker processes; here it
    runs in the trainer's process, where `model.compile_layers` would otherwise compile on one
    thread for the rest of the run. Inductor decides `compile_threads` when its config module is
    first imported, which vLLM's import does: decide again under the restored environment.
    """
    before = os.environ.get(_COMPILE_THREADS)
    config_was_loaded = "torch._inductor.config" in sys.modules
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(_COMPILE_THREADS, None)
        else:
            os.environ[_COMPILE_THREADS] = before
        if not config_was_loaded and "torch._inductor.config" in sys.modules:
            from torch._inductor import config as inductor_config

            inductor_config.compile_threads = inductor_config.decide_compile_threads()


def import_vllm() -> None:
    """Import vLLM without keeping its TORCHINDUCTOR_COMPILE_THREADS=1 (`_keep_inductor_compile_threads`)."""
    with _keep_inductor_compile_threads():
        import vllm  # noqa: F401


class _TokenizerlessWarmupFilter(logging.Filter):
    """Drops vLLM's "Chat template warmup failed" warning (with its traceback) when its cause is
    the tokenizer this engine deliberately skips (`skip_tokenizer_init=True`): `LLM.__init__`
    renders a chat template at every start, unconditionally, and that needs a tokenizer. Any other
    warm-up failure still shows."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage() != "Chat template warmup failed" or not record.exc_info:
            return True
        error = record.exc_info[1]
        return not (isinstance(error, ValueError) and "skip_tokenizer_init" in str(error))


# vllm/renderers/base.py logs it (BaseRenderer.warmup), on its module logger.
_WARMUP_LOGGER = "vllm.renderers.base"


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 300 else text[:297] + "..."


class RolloutEngine:
    """A vLLM `LLM` for one placement, started from an HF-format folder."""

    def __init__(self, config: EngineConfig):
        if config.placement not in PLACEMENTS:
            raise ValueError(f"placement {config.placement!r} is not one of {PLACEMENTS}")
        if not 0.0 < config.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {config.gpu_memory_utilization}")
        if config.tensor_parallel_size < 1:
            raise ValueError(f"vLLM tensor_parallel_size must be >= 1, got {config.tensor_parallel_size}")
        check_model_files(config.model_path)
        self.config = config
        self.eos_token_ids = eos_token_ids(config.model_path)
        # Inside a trainer rank vLLM must reuse the trainer's process group (a second default
        # group cannot exist in one process); external_launcher is vLLM's mode for exactly that.
        self.in_trainer = torch.distributed.is_available() and torch.distributed.is_initialized()
        if self.in_trainer:
            world = torch.distributed.get_world_size()
            if world % config.tensor_parallel_size:
                raise ValueError(f"trainer world size {world} is not divisible by vLLM "
                                 f"tensor_parallel_size {config.tensor_parallel_size}")
        from megatron_lead.versions import require
        require("vllm")  # close() reaches into vLLM's engine core: only the pinned release
        import_vllm()
        from vllm.distributed import parallel_state as vps

        if vps.model_parallel_is_initialized():
            raise RuntimeError("a vLLM engine already runs in this process; close() it first")
        # The in-process weight sync passes a Python iterator to the worker.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        # V1: the runner of every CPU test (see the module docstring). vLLM caches its
        # environment after the first engine start, so this must precede it.
        os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
        with _keep_inductor_compile_threads():  # vLLM's CPU platform sets it again at start
            self.llm = self._start()

    def _engine_kwargs(self) -> dict:
        c = self.config
        kwargs = dict(
            model=str(c.model_path),
            skip_tokenizer_init=True,   # token ids in and out; no tokenizer needed
            tensor_parallel_size=c.tensor_parallel_size,
            dtype=c.dtype,
            max_model_len=c.max_model_len,
            gpu_memory_utilization=c.gpu_memory_utilization,
            kv_cache_memory_bytes=c.kv_cache_memory_bytes,
            enforce_eager=c.enforce_eager,
            seed=c.seed,
            logprobs_mode="processed_logprobs",
        )
        if self.in_trainer:
            kwargs["distributed_executor_backend"] = "external_launcher"
        if on_cpu():
            # A prompt whose prefill is split over two engine steps has its sampled token thrown
            # away and its seeded generator rewound, which CPU generators cannot do ("CPU
            # Generator does not use offset"): keep every prefill whole on CPU.
            kwargs["enable_chunked_prefill"] = False
        if not on_cpu():
            kwargs["enable_sleep_mode"] = True
        return kwargs

    def _start(self):
        from vllm import LLM

        warmup_filter = _TokenizerlessWarmupFilter()
        logging.getLogger(_WARMUP_LOGGER).addFilter(warmup_filter)
        try:
            return LLM(**self._engine_kwargs())
        except Exception as e:  # noqa: BLE001 - re-raised as one line, after cleaning up
            self._release_distributed_state()
            cause = _one_line(e)
            raise RuntimeError(f"vLLM could not start from {self.config.model_path}: {cause}") from e
        finally:
            logging.getLogger(_WARMUP_LOGGER).removeFilter(warmup_filter)

    def _release_distributed_state(self) -> None:
        """Drop the process groups vLLM made, so a failed or closed engine leaves none behind.

        Inside a trainer rank the default group is the trainer's and must survive.
        """
        from vllm.distributed import parallel_state as vps

        vps.destroy_model_parallel()
        if self.in_trainer:
            if vps._WORLD is not None:
                vps._WORLD.destroy()
                vps._WORLD = None
        else:
            vps.destroy_distributed_environment()

    # ---- generation -------------------------------------------------------------------------

    def sampling_params(self, sampling: SamplingConfig, seed: int | None = None):
        from vllm import SamplingParams

        if sampling.n < 1 or sampling.max_response_len < 1:
            raise ValueError(f"need n >= 1 and max_response_len >= 1, got n={sampling.n} "
                             f"max_response_len={sampling.max_response_len}")
        return SamplingParams(
            n=sampling.n,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            max_tokens=sampling.max_response_len,
            stop_token_ids=sorted(set(sampling.stop_token_ids) | set(self.eos_token_ids)),
            logprobs=0,          # the sampled token's log-prob only
            detokenize=False,
            seed=seed,
        )

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig,
                 seeds: Sequence[int] | None = None) -> list[Rollout]:
        """G = sampling.n rollouts per prompt, grouped: rollouts[i*G:(i+1)*G] answer prompts[i].

        seeds: one sampling seed per prompt (vLLM seeds each request on its own, so a prompt's
        samples do not depend on which replica or batch it lands in); default sampling.seed + i.
        """
        from vllm.inputs import TokensPrompt

        if not prompts:
            return []
        if seeds is None:
            seeds = [None if sampling.seed is None else sampling.seed + i for i in range(len(prompts))]
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
        params = [self.sampling_params(sampling, s) for s in seeds]
        if self.llm is None:
            raise RuntimeError("the rollout engine is closed")
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts],
                                    params, use_tqdm=False)
        rollouts = []
        for i, out in enumerate(outputs):
            for completion in out.outputs:
                if completion.finish_reason not in ("stop", "length"):
                    raise RuntimeError(f"vLLM request {i} ended with {completion.finish_reason!r}")
                tokens = list(completion.token_ids)
                logprobs = [step[tok].logprob for tok, step in zip(tokens, completion.logprobs)]
                rollouts.append(Rollout(prompt_index=i, prompt_ids=list(prompts[i]),
                                        response_ids=tokens, logprobs=logprobs,
                                        finish_reason=completion.finish_reason))
        return rollouts

    # ---- life cycle -------------------------------------------------------------------------

    def sleep(self) -> None:
        """Free the GPU memory for training: weights and KV cache both discarded; no-op on CPU.

        Level 2, not 1: level 1 copies every weight to pinned host memory each step only for the
        next sync to overwrite it. vLLM's worker still saves the model's buffers (RoPE caches,
        attention scales: nothing a sync carries) and puts them back on wake-up with "weights".
        """
        if not on_cpu():
            self.llm.sleep(level=2)

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Map the memory of `tags` ("weights", "kv_cache"; None: all) again; no-op on CPU.

        After a level-2 sleep the weights are uninitialised until a sync fills them: wake
        ["weights"], sync, then wake ["kv_cache"], so the KV cache is not held during the sync.
        """
        if not on_cpu():
            self.llm.wake_up(tags=None if tags is None else list(tags))

    def close(self) -> None:
        """Shut vLLM down and drop its process groups (the trainer's default group survives)."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is None:
            return
        core = llm.llm_engine.engine_core
        if not self.in_trainer:
            core.shutdown()  # vLLM's own teardown, its process group included
            return
        # In-process engine in a trainer rank: vLLM's teardown ends by destroying the default
        # process group, which is the trainer's. Run its steps except that one.
        core._finalizer.detach()
        inner = core.engine_core
        inner.structured_output_manager.clear_backend()
        inner.model_executor.shutdown()
        inner.scheduler.shutdown()
        self._release_distributed_state()
