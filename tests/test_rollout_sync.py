"""Megatron (TP x PP ranks from run_local) -> in-process vLLM weight sync on CPU, checked against
the transformers model exported from the same Megatron weights.

Each rank hosts a colocated vLLM engine at TP=1 (vLLM's external_launcher mode); rank 0's results
are compared. The engine starts from a tiny HF model whose weights differ from the Megatron ones, and the
second sync follows a real PPO step (policy.train_step), so a sync that silently does nothing
fails every check.
"""

from __future__ import annotations

import pytest
import torch

from megatron_lead.launch import run_local
from rollout_tiny import ENGINE_ARGS, hf_greedy, hf_logprobs, prompts, save_tiny_qwen2

pytestmark = pytest.mark.slow

GREEDY_LEN = 12
SAMPLE_LEN = 10


def _megatron_logprobs(model, rollouts, vocab_size):
    """Megatron's log-probs of each rollout's response tokens (on the last stage, else None)."""
    from megatron_lead.policy.logprobs import sequence_logprobs
    from megatron_lead.policy.model import forward_logits

    width = max(len(r.prompt_ids) + len(r.response_ids) for r in rollouts)
    tokens = torch.zeros(len(rollouts), width, dtype=torch.long)  # right-padded
    for i, r in enumerate(rollouts):
        seq = r.prompt_ids + r.response_ids
        tokens[i, :len(seq)] = torch.tensor(seq)
    logits = forward_logits(model, tokens)
    if logits is None:
        return None
    logp = sequence_logprobs(logits, tokens, vocab_size=vocab_size)[0]
    return [logp[i, len(r.prompt_ids):len(r.prompt_ids) + len(r.response_ids)].tolist()
            for i, r in enumerate(rollouts)]


def _train_on(model, rollouts, old_logp):
    """One real PPO step (policy.train_step) on the sampled rollouts, advantages +1 / -1."""
    from megatron.core import parallel_state

    from megatron_lead.policy.loss import LossConfig
    from megatron_lead.policy.optim import OptimConfig, build_optimizer, wrap_ddp
    from megatron_lead.policy.train_step import split_micro_batches, train_step

    optim_cfg = OptimConfig(lr=1e-2, clip_grad=1.0)
    wrapped = wrap_ddp(model, optim_cfg)
    optimizer, scheduler = build_optimizer(wrapped, optim_cfg)
    width = max(len(r.prompt_ids) + len(r.response_ids) for r in rollouts)
    tokens = torch.zeros(len(rollouts), width, dtype=torch.long)
    mask = torch.zeros(len(rollouts), width, dtype=torch.bool)
    old = torch.zeros(len(rollouts), width)
    for i, r in enumerate(rollouts):
        p, n = len(r.prompt_ids), len(r.response_ids)
        tokens[i, :p + n] = torch.tensor(r.prompt_ids + r.response_ids)
        mask[i, p:p + n] = True
        if old_logp is not None:
            old[i, p:p + n] = torch.tensor(old_logp[i])
    advantages = torch.tensor([1.0 if i % 2 == 0 else -1.0 for i in range(len(rollouts))])
    last = parallel_state.is_pipeline_last_stage()
    mbs = split_micro_batches(len(rollouts), tokens=tokens, response_mask=mask, advantages=advantages,
                              old_logprobs=old if last else None)
    train_step(wrapped, optimizer, scheduler, mbs, LossConfig(kl_coef=0.0))  # no reference needed


def _rank(rank, world, tp, pp, hf_dir, out_dir):
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_lead.policy.convert.gather import save_hf_checkpoint
    from megatron_lead.policy.model import build_model, unwrap
    from megatron_lead.policy.parallel import init_parallel
    from megatron_lead.rollout.engine import EngineConfig, RolloutEngine, SamplingConfig
    from megatron_lead.rollout.sync import make_weight_sync, sync_policy_weights

    init_parallel(tp=tp, pp=pp, seed=123)
    model = build_model(hf_dir, dtype=torch.float32)
    with torch.no_grad():  # Megatron's init (std 0.02) gives near-flat logits: sharpen them
        for p in model[0].parameters():
            if p.dim() == 2:
                p.mul_(5.0)
    vocab = unwrap(model[0]).arch.vocab_size
    engine = RolloutEngine(EngineConfig(model_path=hf_dir, **ENGINE_ARGS))
    weight_sync = make_weight_sync(engine)
    greedy = SamplingConfig(temperature=0.0, max_response_len=GREEDY_LEN)
    sample = SamplingConfig(temperature=1.0, max_response_len=SAMPLE_LEN, seed=11)
    batch = prompts(8)
    last_tp0 = (parallel_state.is_pipeline_last_stage()
                and parallel_state.get_tensor_model_parallel_rank() == 0)

    def step(tag):
        # 64 KiB buckets: the tiny model's 1.6 MB of weights travel in many of them.
        stats = sync_policy_weights(model, weight_sync, bucket_bytes=64 << 10)
        save_hf_checkpoint(model, f"{out_dir}/{tag}", hf_source_dir=hf_dir)
        greedy_out = engine.generate(batch, greedy)
        sampled = engine.generate(batch, sample)
        # Every rank's engine sampled with the same seeds; use rank 0's tokens everywhere anyway.
        box = [sampled]
        dist.broadcast_object_list(box, src=0)
        megatron_logp = _megatron_logprobs(model, box[0], vocab)
        return dict(stats=stats, greedy=greedy_out, sampled=box[0], megatron_logp=megatron_logp)

    before = engine.generate(batch, greedy)
    first = step("initial")
    _train_on(model, first["sampled"], first["megatron_logp"])
    second = step("trained")
    engine.close()
    return dict(before=before, first=first, second=second, last_tp0=last_tp0)


def _check(result_rank0, logp_source, out_dir, tag):
    import transformers

    hf = transformers.Qwen2ForCausalLM.from_pretrained(f"{out_dir}/{tag}", torch_dtype=torch.float32).eval()
    for r in result_rank0["greedy"]:
        expected = hf_greedy(hf, r.prompt_ids, GREEDY_LEN)
        assert r.response_ids == expected[:len(r.response_ids)], tag
    diffs_hf, diffs_megatron = [], []
    for r, m_logp in zip(result_rank0["sampled"], logp_source):
        ref = hf_logprobs(hf, r.prompt_ids, r.response_ids)
        diffs_hf += [abs(a - b) for a, b in zip(r.logprobs, ref)]
        diffs_megatron += [abs(a - b) for a, b in zip(r.logprobs, m_logp)]
    mean_hf, mean_megatron = sum(diffs_hf) / len(diffs_hf), sum(diffs_megatron) / len(diffs_megatron)
    print(f"{tag}: mean |logp_vLLM - logp_HF| = {mean_hf:.2e}, |logp_vLLM - logp_Megatron| = "
          f"{mean_megatron:.2e} over {len(diffs_hf)} sampled tokens")
    assert mean_hf < 1e-3 and mean_megatron < 1e-3, tag
    return hf


@pytest.mark.parametrize("tp,pp", [(2, 2)])  # TP gather + PP broadcast; world 4
def test_sync_from_megatron_matches_exported_hf(tmp_path, tp, pp):
    import transformers

    hf_dir = save_tiny_qwen2(tmp_path / "hf", seed=0)
    out_dir = str(tmp_path / "export")
    results = run_local(_rank, tp * pp, tp, pp, hf_dir, out_dir)
    rank0 = results[0]
    last = next(r for r in results if r["last_tp0"])

    stats = rank0["first"]["stats"]
    print(stats.line())
    hf_start = transformers.Qwen2ForCausalLM.from_pretrained(hf_dir)
    assert stats.bytes == sum(t.numel() * 4 for t in hf_start.state_dict().values())
    assert stats.tensors == 1 + 2 * 12 + 2  # embedding, 12 per layer, final norm, lm_head
    assert stats.buckets > 10 and stats.seconds > 0

    # The engine's start weights are not the Megatron ones: its greedy outputs change with the sync.
    assert [r.response_ids for r in rank0["before"]] != [r.response_ids for r in rank0["first"]["greedy"]]
    hf_first = _check(rank0["first"], last["first"]["megatron_logp"], out_dir, "initial")
    _check(rank0["second"], last["second"]["megatron_logp"], out_dir, "trained")
    greedy_ids = {tag: [r.response_ids for r in rank0[tag]["greedy"]] for tag in ("first", "second")}
    assert greedy_ids["first"] != greedy_ids["second"]  # the trained weights answer differently
    # The second sync really replaced the first weights (its log-probs match only the new model).
    r = rank0["second"]["sampled"][0]
    stale = hf_logprobs(hf_first, r.prompt_ids, r.response_ids)
    assert max(abs(a - b) for a, b in zip(r.logprobs, stale)) > 1e-2


def _save_tied_storing_lm_head(path) -> str:
    """A tied tiny Qwen2 whose safetensors also stores lm_head.weight (an equal copy of the
    embedding), as some released tied checkpoints do; the converter accepts such a folder."""
    from safetensors.torch import load_file, save_file

    hf_dir = save_tiny_qwen2(path, seed=0, tie_word_embeddings=True)
    (file,) = path.glob("*.safetensors")
    tensors = load_file(file)
    assert "lm_head.weight" not in tensors  # transformers drops the tied copy; put it back
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, file, metadata={"format": "pt"})
    return hf_dir


def _tied_rank(rank, world, hf_dir):
    from megatron_lead.policy.model import build_model, forward_logits, unwrap
    from megatron_lead.policy.parallel import init_parallel
    from megatron_lead.rollout.engine import EngineConfig, RolloutEngine, SamplingConfig
    from megatron_lead.rollout.sync import make_weight_sync, sync_policy_weights

    init_parallel(tp=1, pp=1, seed=321)
    model = build_model(hf_dir, dtype=torch.float32)  # Megatron's own init: not the engine's weights
    with torch.no_grad():
        for p in model[0].parameters():
            if p.dim() == 2:
                p.mul_(5.0)
    vocab = unwrap(model[0]).arch.vocab_size
    engine = RolloutEngine(EngineConfig(model_path=hf_dir, **ENGINE_ARGS))
    try:
        batch = prompts(8)
        greedy = SamplingConfig(temperature=0.0, max_response_len=GREEDY_LEN)
        before = engine.generate(batch, greedy)
        stats = sync_policy_weights(model, make_weight_sync(engine), bucket_bytes=64 << 10)
        after = engine.generate(batch, greedy)
        sampled = engine.generate(batch, SamplingConfig(temperature=1.0, max_response_len=SAMPLE_LEN, seed=5))
    finally:
        engine.close()
    megatron_logp = _megatron_logprobs(model, sampled, vocab)
    # Megatron's greedy choice at every position of the engine's greedy answers (teacher-forced).
    width = max(len(r.prompt_ids) + len(r.response_ids) for r in after)
    tokens = torch.zeros(len(after), width, dtype=torch.long)
    for i, r in enumerate(after):
        tokens[i, :len(r.prompt_ids) + len(r.response_ids)] = torch.tensor(r.prompt_ids + r.response_ids)
    argmax = forward_logits(model, tokens)[..., :vocab].argmax(-1)
    megatron_greedy = [argmax[i, len(r.prompt_ids) - 1:len(r.prompt_ids) + len(r.response_ids) - 1].tolist()
                       for i, r in enumerate(after)]
    return dict(stats=stats, before=before, after=after, sampled=sampled, megatron_logp=megatron_logp,
                megatron_greedy=megatron_greedy)


def test_sync_into_tied_checkpoint_that_stores_lm_head(tmp_path):
    """The engine starts from a tied folder that also stores lm_head.weight: the policy streams
    no head (it is the embedding), and the sync must accept that, as the converter does."""
    from megatron_lead.policy.convert.checkpoint import hf_to_megatron

    hf_dir = _save_tied_storing_lm_head(tmp_path / "hf")
    hf_to_megatron(hf_dir, str(tmp_path / "ckpt"))  # the converter takes it (one rule for both)
    out = run_local(_tied_rank, 1, hf_dir)[0]
    assert out["stats"].tensors == 1 + 2 * 12 + 1  # embedding, 12 per layer, final norm; no head
    assert [r.response_ids for r in out["before"]] != [r.response_ids for r in out["after"]]
    for r, want in zip(out["after"], out["megatron_greedy"]):
        assert r.response_ids == want
    diffs = [abs(a - b) for r, m in zip(out["sampled"], out["megatron_logp"]) for a, b in zip(r.logprobs, m)]
    assert len(diffs) > 20 and sum(diffs) / len(diffs) < 1e-3
