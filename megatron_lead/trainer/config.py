"""The trainer's settings: plain dataclasses, one per concern, loaded from YAML plus dotted overrides.

    megatron-lead train --config run.yaml rollout.n=8 optim.lr=2e-6 lead.method=grpo

`load_config` merges the YAML file and the `key=value` overrides (values parsed as YAML scalars,
then coerced to the field's type), rejects unknown keys with the closest valid name, and
`TrainConfig.validate` checks everything that can be checked before anything heavy starts, each
failure one line naming the key. Parallel sizes use Megatron's names. Defaults are the paper's
1.5B run (LEAD_SPEC section 8) where the paper sets a value.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass, field, fields

import yaml

from megatron_lead.lead.config import METHODS, LeadConfig, check_method
from megatron_lead.policy.loss import LossConfig
from megatron_lead.policy.optim import OptimConfig


@dataclass
class ModelSection:
    path: str = ""
    """HF folder of the starting policy (config.json, *.safetensors, tokenizer files)."""
    tokenizer: str | None = None
    """Tokenizer folder; None = model.path."""
    attention: str = "auto"
    """Megatron attention: auto (Transformer Engine if importable, else SDPA) | te | sdpa | local."""
    compile_layers: bool = False
    """torch.compile each transformer layer of the policy (dynamic shapes: varying RL lengths reuse
    the compiled graphs). Needs a C/C++ compiler; the first steps pay the compilation."""


@dataclass
class ParallelSection:
    tensor_model_parallel_size: int = 1
    """Megatron tensor-parallel size of the policy."""
    pipeline_model_parallel_size: int = 1
    """Megatron pipeline-parallel size of the policy. Data-parallel size = world / (TP x PP)."""


@dataclass
class DataSection:
    train_path: str = ""
    """Training prompts: JSONL or Parquet with `prompt` or `problem`, `answer`, optional `id`."""
    val_path: str | None = None
    """Validation prompts (same format), graded with greedy decoding every validation.every steps."""
    instruction: str = " Let's think step by step and output the final answer within \\boxed{}."
    """Appended to every problem before the chat template (the paper's suffix)."""
    use_chat_template: bool = True
    """Wrap the prompt in the tokenizer's chat template (with the generation prompt)."""
    max_prompt_len: int = 1024
    """Prompts longer than this (tokens, template included) are dropped and counted."""
    prompts_per_step: int = 128
    """Prompts of one RL step, over all ranks (the global batch)."""
    stratify_levels: bool = False
    """Every step's prompts hold the data's levels (its `level` field) in equal numbers (the
    sampler interleaves each epoch's shuffle over the levels; data/sampler.stratified)."""


@dataclass
class RolloutSection:
    n: int = 8
    """G: rollouts per prompt (at least 2: the group statistics need them)."""
    temperature: float = 1.0
    """Sampling temperature (the loss uses the same one)."""
    top_p: float = 1.0
    """Nucleus sampling; below 1 the PPO ratio no longer starts exactly at 1."""
    max_response_len: int = 8000
    """Response tokens at most (= lead.l_max)."""
    tensor_parallel_size: int = 1
    """vLLM's own tensor-parallel size; world / this = number of vLLM replicas."""
    dtype: str = "auto"
    """vLLM weight dtype: auto | float32 | bfloat16."""
    gpu_memory_utilization: float = 0.5
    """vLLM's memory fraction (of host RAM on CPU: set kv_cache_memory_bytes there instead)."""
    kv_cache_memory_bytes: int | None = None
    """Explicit vLLM KV-cache size in bytes; overrides the fraction."""
    enforce_eager: bool = False
    """No CUDA graphs / compilation in vLLM (faster start, slower decode)."""
    offload_train_state: bool | None = None
    """Move Megatron's gradient buffers and optimizer state (fp32 main params, Adam moments) to
    pinned host memory while vLLM holds the GPU (engine start, generation) and back for the
    update (policy/offload.py): 16 bytes per parameter (12 / DP with the distributed optimizer)
    left to vLLM's KV cache. None = on with CUDA, off on CPU (where it runs too, for the tests)."""
    offload_weights: bool = False
    """With offload_train_state: the policy's weights too (2 bytes per parameter in bf16), after
    the weight sync has read them."""
    filter_groups: bool = False
    """Train only on prompt groups with a signal: a group whose G scores are all equal (all right
    or all wrong) is dropped (DAPO's dynamic sampling; trainer/filtering.py). LEAD still scores
    every sampled rollout; the trained groups fill whole mini-batches, at most prompts_per_step."""
    filter_keep_eff_varying: bool = True
    """With filter_groups: keep a zero-variance group whose efficiency reward still varies (LEAD's
    length signal on solved prompts); false: DAPO's rule (the same for lead.method=grpo)."""
    refill_max_rounds: int = 0
    """With filter_groups: while fewer than prompts_per_step groups are kept, sample up to this
    many more rounds of prompts_per_step prompts each (DAPO's refill); 0: train on what is kept."""

    @property
    def offloads(self) -> bool:
        import torch

        return torch.cuda.is_available() if self.offload_train_state is None else self.offload_train_state


@dataclass
class PPOSection:
    steps: int = 462
    """RL steps of the run (each: rollouts, advantages, mini-batch updates)."""
    mini_batch_prompts: int = 16
    """Prompts per optimizer update (prompts_per_step / this = updates per step and epoch)."""
    micro_batch_size: int = 1
    """Sequences per forward/backward on one data-parallel rank."""
    epochs: int = 1
    """Passes over each step's rollouts."""
    pack_sequences: bool = False
    """Pack each micro-batch's rollouts into one sequence without padding (Megatron's packed-sequence
    parameters; policy/packing.py): no compute on padding, the same log-probs and loss."""
    max_tokens_per_micro_batch: int = 0
    """With pack_sequences: micro-batches of as many consecutive rollouts as fit in this many tokens
    (a longer rollout gets one of its own), instead of micro_batch_size rollouts. 0: off."""
    max_consecutive_skipped_steps: int = 5
    """Stop the run after this many steps in a row that each skipped an optimizer update for a
    non-finite loss or gradient (a skip leaves weights and optimizer state untouched); 0: never."""


@dataclass
class GradingSection:
    workers: int = 2
    """Grader processes per trainer rank (each rank grades a share of the step's responses)."""
    timeout: float = 5.0
    """Seconds per answer; a slower one scores 0 (reason `timeout`) and its worker is replaced."""


@dataclass
class CheckpointSection:
    every: int = 20
    """Save a resumable checkpoint every this many steps (0: only at the end)."""
    keep_last: int = 3
    """Complete checkpoints kept; older ones are deleted."""
    hf_export_every: int = 0
    """Export the policy as an HF folder every this many steps (0: only at the end)."""


@dataclass
class ValidationSection:
    every: int = 20
    """Greedy validation on data.val_path every this many steps (0: never; also runs at the end)."""
    max_prompts: int = 0
    """Validate on this many prompts spread evenly over the file (0: all); the same ones every time."""


@dataclass
class LoggingSection:
    tensorboard: bool = True
    """Write TensorBoard event files into the run folder."""
    progress: bool = True
    """A progress bar on rank 0 (step, reward, length, w_eff, ETA)."""


@dataclass
class TrainConfig:
    run_dir: str = "runs/lead"
    """Output folder: metrics.jsonl, TensorBoard files, checkpoints/, hf/, summary.json."""
    seed: int = 0
    """Seeds the data order, the sampling seeds (per step and prompt) and Megatron's init RNG."""
    model: ModelSection = field(default_factory=ModelSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    data: DataSection = field(default_factory=DataSection)
    rollout: RolloutSection = field(default_factory=RolloutSection)
    ppo: PPOSection = field(default_factory=PPOSection)
    lead: LeadConfig = field(default_factory=LeadConfig)
    """Advantage computation: lead.method picks LEAD or a baseline (lead/config.py METHODS)."""
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    grading: GradingSection = field(default_factory=GradingSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    validation: ValidationSection = field(default_factory=ValidationSection)
    logging: LoggingSection = field(default_factory=LoggingSection)

    @property
    def updates_per_step(self) -> int:
        return self.data.prompts_per_step // self.ppo.mini_batch_prompts * self.ppo.epochs

    def validate(self, world_size: int | None = None, check_paths: bool = True) -> None:
        """One-line ValueError naming the key of the first problem found."""
        tp, pp = self.parallel.tensor_model_parallel_size, self.parallel.pipeline_model_parallel_size
        for key, value in (("parallel.tensor_model_parallel_size", tp),
                           ("parallel.pipeline_model_parallel_size", pp),
                           ("rollout.tensor_parallel_size", self.rollout.tensor_parallel_size),
                           ("data.prompts_per_step", self.data.prompts_per_step),
                           ("ppo.mini_batch_prompts", self.ppo.mini_batch_prompts),
                           ("ppo.micro_batch_size", self.ppo.micro_batch_size),
                           ("ppo.steps", self.ppo.steps), ("ppo.epochs", self.ppo.epochs),
                           ("rollout.max_response_len", self.rollout.max_response_len),
                           ("data.max_prompt_len", self.data.max_prompt_len),
                           ("grading.workers", self.grading.workers)):
            if value < 1:
                raise ValueError(f"{key}={value} must be >= 1")
        if self.ppo.max_tokens_per_micro_batch < 0:
            raise ValueError(f"ppo.max_tokens_per_micro_batch={self.ppo.max_tokens_per_micro_batch} must be >= 0")
        if self.rollout.offload_weights and not self.rollout.offloads:
            raise ValueError("rollout.offload_weights needs rollout.offload_train_state (on by default with CUDA)")
        if self.ppo.max_tokens_per_micro_batch and not self.ppo.pack_sequences:
            raise ValueError("ppo.max_tokens_per_micro_batch needs ppo.pack_sequences=true (padded micro-batches "
                             "all have one shape)")
        if self.rollout.n < 2:
            raise ValueError(f"rollout.n={self.rollout.n}: GRPO/LEAD group statistics need at least "
                             "2 rollouts per prompt")
        if world_size is not None:
            if world_size % (tp * pp):
                raise ValueError(f"parallel: world size {world_size} is not a multiple of "
                                 f"tensor_model_parallel_size x pipeline_model_parallel_size = {tp} x {pp}")
            if world_size % self.rollout.tensor_parallel_size:
                raise ValueError(f"rollout.tensor_parallel_size={self.rollout.tensor_parallel_size} "
                                 f"does not divide the world size {world_size}")
            self._check_batch_split(world_size // (tp * pp))
        if self.data.prompts_per_step % self.ppo.mini_batch_prompts:
            raise ValueError(f"data.prompts_per_step={self.data.prompts_per_step} is not divisible by "
                             f"ppo.mini_batch_prompts={self.ppo.mini_batch_prompts}")
        if abs(self.loss.temperature - self.rollout.temperature) > 0:
            raise ValueError(f"loss.temperature={self.loss.temperature} differs from rollout.temperature="
                             f"{self.rollout.temperature}: the PPO ratio would not start at 1")
        if self.rollout.temperature <= 0:
            raise ValueError(f"rollout.temperature={self.rollout.temperature} must be positive")
        if float(self.lead.l_max) != float(self.rollout.max_response_len):
            raise ValueError(f"lead.l_max={self.lead.l_max:g} differs from rollout.max_response_len="
                             f"{self.rollout.max_response_len}: unsolved prompts would get the wrong target")
        if self.grading.timeout <= 0:
            raise ValueError(f"grading.timeout={self.grading.timeout} must be positive")
        if self.ppo.max_consecutive_skipped_steps < 0:
            raise ValueError(f"ppo.max_consecutive_skipped_steps={self.ppo.max_consecutive_skipped_steps} "
                             "must be >= 0")
        if self.checkpoint.keep_last < 1:
            raise ValueError(f"checkpoint.keep_last={self.checkpoint.keep_last} must be >= 1")
        self._check_rl_options()
        self.lead.validate()
        self.loss.validate()
        self.optim.validate()
        if check_paths:
            self._check_paths()

    def _check_rl_options(self) -> None:
        """Group filtering, refill and overlong shaping (the loss's own keys: LossConfig.validate)."""
        if self.rollout.refill_max_rounds < 0:
            raise ValueError(f"rollout.refill_max_rounds={self.rollout.refill_max_rounds} must be >= 0")
        if self.rollout.refill_max_rounds and not self.rollout.filter_groups:
            raise ValueError("rollout.refill_max_rounds needs rollout.filter_groups=true (only filtering "
                             "leaves a step short of groups)")
        if self.loss.overlong_buffer >= self.rollout.max_response_len:
            raise ValueError(f"loss.overlong_buffer={self.loss.overlong_buffer} must be below "
                             f"rollout.max_response_len={self.rollout.max_response_len}")

    def _check_batch_split(self, dp: int) -> None:
        rollouts = self.ppo.mini_batch_prompts * self.rollout.n
        if rollouts % dp or (rollouts // dp) % self.ppo.micro_batch_size:
            raise ValueError(f"ppo: a mini-batch of {self.ppo.mini_batch_prompts} prompts x rollout.n="
                             f"{self.rollout.n} = {rollouts} rollouts does not split into {dp} data-"
                             f"parallel rank(s) x micro-batches of ppo.micro_batch_size="
                             f"{self.ppo.micro_batch_size}")

    def _check_paths(self) -> None:
        if not self.model.path:
            raise ValueError("model.path is not set (an HF model folder)")
        if not os.path.isfile(os.path.join(self.model.path, "config.json")):
            raise ValueError(f"model.path={self.model.path}: no HF model there (config.json missing)")
        tok = self.model.tokenizer or self.model.path
        if not os.path.isdir(tok):
            raise ValueError(f"model.tokenizer={tok}: no such folder")
        if not self.data.train_path:
            raise ValueError("data.train_path is not set (a JSONL or Parquet file of prompts)")
        for key in ("train_path", "val_path"):
            path = getattr(self.data, key)
            if path and not os.path.isfile(path):
                raise ValueError(f"data.{key}={path}: no such file")
        _check_writable("run_dir", self.run_dir)
        self._check_model_fits()

    def _check_model_fits(self) -> None:
        """The parallel sizes divide the model's layers and heads (Megatron and vLLM assert this
        deep inside, after every rank has started); read from the HF config.json. A size the
        file does not give is left to the model build."""
        import json

        try:
            with open(os.path.join(self.model.path, "config.json")) as f:
                hf = json.load(f)
            layers, heads = int(hf.get("num_hidden_layers") or 0), int(hf.get("num_attention_heads") or 0)
            groups = int(hf.get("num_key_value_heads") or heads)
        except (OSError, ValueError, TypeError, AttributeError) as e:
            raise ValueError(f"model.path={self.model.path}: unreadable config.json ({type(e).__name__})") from None
        tp, pp = self.parallel.tensor_model_parallel_size, self.parallel.pipeline_model_parallel_size
        vtp = self.rollout.tensor_parallel_size
        for key, size, count, what in (("parallel.pipeline_model_parallel_size", pp, layers, "layers"),
                                       ("parallel.tensor_model_parallel_size", tp, heads, "attention heads"),
                                       ("parallel.tensor_model_parallel_size", tp, groups, "key-value heads"),
                                       ("rollout.tensor_parallel_size", vtp, heads, "attention heads")):
            if count and count % size:
                raise ValueError(f"{key}={size} does not divide the model's {count} {what}")
        self._check_family(hf, tp)

    def _check_family(self, hf: dict, tp: int) -> None:
        """What the model's family cannot do here, refused before any rank starts (the model build
        and the first forward would refuse it too, later): an unsupported architecture, a sliding
        window shorter than prompt + response, a mixture-of-experts update at TP > 1."""
        from megatron_lead.policy.convert.arch import arch_from_hf, check_sequence_length

        try:
            arch = arch_from_hf(hf)
            check_sequence_length(arch, self.data.max_prompt_len + self.rollout.max_response_len,
                                  "data.max_prompt_len + rollout.max_response_len")
        except ValueError as e:
            raise ValueError(f"model.path={self.model.path}: {e}") from None
        if arch.is_moe and tp > 1:
            raise ValueError(f"parallel.tensor_model_parallel_size={tp}: a mixture-of-experts model trains at "
                             "TP=1 here (Megatron's MoE layer needs sequence parallelism at TP > 1, not used)")


def _check_writable(key: str, path: str) -> None:
    """The folder exists and is writable, or could be created: its nearest existing ancestor is
    a writable folder. Checked before anything starts, so a bad run_dir does not cost a model
    load and a vLLM start (access() also sees read-only mounts, even for root)."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise ValueError(f"{key}={path}: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"{key}={path}: {probe} is not writable")


# ------------------------------------------------------------------------------ loading

def _sections(cls) -> dict[str, type]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls) if dataclasses.is_dataclass(hints[f.name])}


def _all_keys() -> list[str]:
    keys = []
    for f in fields(TrainConfig):
        sub = _sections(TrainConfig).get(f.name)
        keys += [f"{f.name}.{g.name}" for g in fields(sub)] if sub else [f.name]
    return keys


def _unknown(key: str) -> ValueError:
    close = difflib.get_close_matches(key, _all_keys(), n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]}?" if close else ""
    return ValueError(f"unknown config key {key!r}{hint}")


def _coerce(key: str, value, hint):
    """Value (from YAML or an override) as the field's type; one-line error naming the key."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
    try:
        if hint is bool:
            if isinstance(value, bool):
                return value
            raise TypeError
        if hint is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(value)
        if hint is float:
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if hint is str:
            if isinstance(value, (dict, list)):
                raise TypeError
            return str(value)
    except (TypeError, ValueError):
        raise ValueError(f"{key}={value!r} is not a valid {getattr(hint, '__name__', hint)}") from None
    return value


def _flatten(raw: dict, source: str) -> dict[str, object]:
    if not isinstance(raw, dict):
        raise ValueError(f"{source}: the top level must be a mapping of sections")
    flat = {}
    sections = _sections(TrainConfig)
    for key, value in raw.items():
        if key in sections:
            if value is None:
                continue
            if not isinstance(value, dict):
                raise ValueError(f"{source}: section {key!r} must be a mapping")
            for sub, v in value.items():
                flat[f"{key}.{sub}"] = v
        else:
            flat[str(key)] = value
    return flat


def parse_overrides(items: list[str]) -> dict[str, object]:
    """`a.b=value` strings -> {"a.b": value}; values parsed as YAML scalars (2e-6, true, null)."""
    out = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} is not of the form key=value")
        try:
            out[key.strip()] = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError:
            out[key.strip()] = text
    return out


def build_config(values: dict[str, object]) -> TrainConfig:
    """TrainConfig from flat dotted keys; `lead.method` picks the preset the other lead keys refine."""
    sections = _sections(TrainConfig)
    top_hints = typing.get_type_hints(TrainConfig)
    parts: dict[str, dict] = {name: {} for name in sections}
    top: dict[str, object] = {}
    for key, value in values.items():
        head, _, tail = key.partition(".")
        if head in sections and tail:
            hints = typing.get_type_hints(sections[head])
            if tail not in hints:
                raise _unknown(key)
            parts[head][tail] = _coerce(key, value, hints[tail])
        elif not tail and head in top_hints and head not in sections:
            top[head] = _coerce(key, value, top_hints[head])
        else:
            raise _unknown(key)
    lead = dict(parts.pop("lead"))
    method = lead.pop("method", "lead")
    check_method(method)
    cfg = TrainConfig(**top, **{name: sections[name](**kw) for name, kw in parts.items()})
    # l_max follows the maximum response length unless set (validate() rejects a mismatch).
    lead.setdefault("l_max", float(cfg.rollout.max_response_len))
    cfg.lead = LeadConfig(method=method, **{**METHODS[method], **lead})
    # The loss temperature follows the sampling temperature unless set (validate() checks).
    if "loss.temperature" not in values:
        cfg.loss.temperature = cfg.rollout.temperature
    # Dr. GRPO's constant normaliser is the generation budget unless set.
    if not cfg.loss.agg_norm_len:
        cfg.loss.agg_norm_len = cfg.rollout.max_response_len
    if "optim.total_steps" not in values:
        cfg.optim.total_steps = max(cfg.ppo.steps * cfg.updates_per_step, cfg.optim.warmup_steps + 1)
    return cfg


def load_config(path: str | None, overrides: list[str] | None = None) -> TrainConfig:
    """YAML file (or defaults when path is None) + `key=value` overrides -> TrainConfig (unvalidated)."""
    values: dict[str, object] = {}
    if path:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"config file {path} does not exist")
        try:
            with open(path) as f:
                raw = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: not valid YAML ({' '.join(str(e).split())[:200]})") from None
        values.update(_flatten(raw, path))
    values.update(parse_overrides(overrides or []))
    return build_config(values)


def to_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: TrainConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, width=120)
