"""rollout_step on CPU: four Megatron ranks (PP=2 x DP=2), each hosting its own in-process vLLM (TP=1),
then the PPO phase's old-log-prob pass over the step's rows (the rollout/trainer gap is measured
there, on the micro-batches the update runs).

The engine starts from a tiny HF model whose weights are not the Megatron ones, so the log-prob
check fails unless the step's weight sync really happened. The reference for the log-probs is
transformers, run on the Megatron weights exported to HF format.
"""

from __future__ import annotations

import pytest
import torch

from megatron_lead.launch import run_local
from megatron_lead.rollout.sync.reload import ReloadWeightSync
from rollout_tiny import ENGINE_ARGS, hf_logprobs, prompts, save_tiny_qwen2

pytestmark = pytest.mark.slow

PAD_ID = 253
MAX_LEN = 4
# A quarter of the vocabulary stops a rollout: with MAX_LEN = 4 some stop, some are cut off.
SAMPLING = dict(n=2, temperature=0.7, max_response_len=MAX_LEN, stop_token_ids=tuple(range(0, 250, 4)))
PROMPTS = prompts(8, seed=1)  # the step's global prompt list


class _StaleSync(ReloadWeightSync):
    """Drains the weight stream without loading it: the engine keeps its old weights."""

    def push(self, buckets):
        for _ in buckets:
            pass


def _rank(rank, world, tp, pp, hf_dir, out_dir):
    import psutil
    import torch.distributed as dist

    from megatron.core import parallel_state

    from megatron_lead.policy.convert.gather import save_hf_checkpoint
    from megatron_lead.policy.model import build_model
    from megatron_lead.policy.parallel import init_parallel
    from megatron_lead.rollout.engine import EngineConfig, RolloutEngine, SamplingConfig
    from megatron_lead.rollout.step import rollout_step, sampling_seed
    from megatron_lead.rollout.sync import make_weight_sync
    from megatron_lead.trainer.ppo import mini_batches, old_logprob_pass

    init_parallel(tp=tp, pp=pp, seed=123)

    # A vLLM that cannot start inside a trainer rank: one line, no processes left, and the
    # trainer's group survives for the engine that does start below.
    children = {p.pid for p in psutil.Process().children(recursive=True)}
    bad = EngineConfig(model_path=hf_dir, **{**ENGINE_ARGS, "kv_cache_memory_bytes": None,
                                             "gpu_memory_utilization": 1.0})
    try:
        RolloutEngine(bad)
        start_error = None
    except RuntimeError as e:
        start_error = str(e)
    left_over = {p.pid for p in psutil.Process().children(recursive=True)} - children

    torch.manual_seed(123)  # Megatron's CPU init draws from the default generator: same model every run
    model = build_model(hf_dir, dtype=torch.float32)
    dp_group = parallel_state.get_data_parallel_group()
    with torch.no_grad():
        for p in model[0].parameters():
            if p.dim() == 2:  # Megatron's init (std 0.02) gives near-flat logits: sharpen them
                p.mul_(5.0)
            # One policy on every DP rank (random init differs per process; DDP would do this).
            dist.broadcast(p, src=dist.get_process_group_ranks(dp_group)[0], group=dp_group)
    save_hf_checkpoint(model, out_dir, hf_source_dir=hf_dir)
    engine = RolloutEngine(EngineConfig(model_path=hf_dir, **ENGINE_ARGS))
    sampling = SamplingConfig(**SAMPLING)
    seeds = [sampling_seed(7, 3, 100 + i) for i in range(len(PROMPTS))]
    def step(sync):
        batch = rollout_step(model, engine, sync, PROMPTS, sampling, pad_id=PAD_ID, seeds=seeds)
        batches = mini_batches(batch, torch.zeros(batch.tokens.size(0)), 1, micro_batch_size=4)
        batch.metrics.update(old_logprob_pass(model, batches, sampling.temperature))
        last = parallel_state.is_pipeline_last_stage()
        return batch, torch.cat([mb.old_logprobs for mb in batches[0]]) if last else None

    batch, old_logprobs = step(make_weight_sync(engine))
    # Seeds follow the prompt: one replica generating every prompt gives the same rollouts.
    alone = engine.generate(PROMPTS, sampling, seeds) if rank == 0 else None
    # A weight sync that loads nothing, after the policy moved: the metric must see the gap.
    with torch.no_grad():
        for p in model[0].parameters():
            p.mul_(1.3)
    stale = step(_StaleSync(engine))[0].metrics
    engine.close()
    # One rank per DP rank holds the full result: the last pipeline stage's TP rank 0.
    owner = parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0
    return dict(batch=batch, old_logprobs=old_logprobs, start_error=start_error, left_over=left_over,
                owner=owner, dp_rank=parallel_state.get_data_parallel_rank(), alone=alone, stale=stale)


# PP=2: old_logprobs on the last stage only, the metric all-reduced over PP. DP=2: each DP rank
# keeps its half of the step's rollouts, metrics all-reduced over DP. Four vLLM replicas (TP=1),
# each generating a quarter of the prompts.
# The extended tier (`pytest -m long`): four ranks on two cores take a minute; the trainer's e2e
# runs cover DP=2 and PP=2 rollouts against one rank in CI (tests/test_trainer_e2e.py).
@pytest.mark.long
@pytest.mark.parametrize("world,tp,pp", [(4, 1, 2)])
def test_rollout_step(tmp_path, world, tp, pp):
    import transformers

    hf_dir = save_tiny_qwen2(tmp_path / "hf", seed=0)
    out_dir = str(tmp_path / "megatron_as_hf")
    results = run_local(_rank, world, tp, pp, hf_dir, out_dir)
    owners = sorted((r for r in results if r["owner"]), key=lambda r: r["dp_rank"])  # one per DP rank
    assert len(owners) == world // (tp * pp)
    metrics = owners[0]["batch"].metrics
    print({k: round(v, 8) for k, v in metrics.items()})
    print("failed start:", results[0]["start_error"])

    G = SAMPLING["n"]
    everything = results[0]["batch"].all_rollouts
    for r in results:
        assert r["start_error"] is not None and "vLLM could not start" in r["start_error"]
        assert "\n" not in r["start_error"] and "memory" in r["start_error"].lower()
        assert not r["left_over"]
        assert r["batch"].metrics == metrics  # the same on every rank (times: the slowest's)
        assert [x.response_ids for x in r["batch"].all_rollouts] == [x.response_ids for x in everything]
        if not r["owner"] and pp > 1:
            assert r["old_logprobs"] is None  # first pipeline stage

    # Every prompt's G rollouts generated exactly once, in prompt order, and kept.
    assert metrics["rollout/generated_sequences"] == len(everything) == len(PROMPTS) * G
    assert [x.prompt_index for x in everything] == [i // G for i in range(len(everything))]
    assert [x.prompt_ids for x in everything] == [PROMPTS[i // G] for i in range(len(everything))]
    assert [x.response_ids for x in results[0]["alone"]] == [x.response_ids for x in everything]
    # Each DP rank trains on its own half; together they cover the step exactly once.
    assert sorted(i for o in owners for i in o["batch"].rows) == list(range(len(everything)))

    hf = transformers.Qwen2ForCausalLM.from_pretrained(out_dir, torch_dtype=torch.float32).eval()
    gaps, old_vs_hf, diff_sum, diff_tokens = [], [], 0.0, 0
    for owner in owners:
        batch, rollouts = owner["batch"], owner["batch"].rollouts
        # Packing: row i is rollout i, right-padded, the mask exactly on its response tokens.
        assert len(rollouts) == len(everything) // 2 == batch.tokens.size(0)
        width = max(len(r.prompt_ids) + len(r.response_ids) for r in rollouts)
        assert batch.tokens.shape == batch.response_mask.shape == owner["old_logprobs"].shape == (8, width)
        for i, r in enumerate(rollouts):
            p, n = len(r.prompt_ids), len(r.response_ids)
            assert r is not None and r.response_ids == everything[batch.rows[i]].response_ids
            assert batch.tokens[i].tolist() == r.prompt_ids + r.response_ids + [PAD_ID] * (width - p - n)
            assert batch.response_mask[i].tolist() == [False] * p + [True] * n + [False] * (width - p - n)
            assert batch.rollout_logprobs[i, p:p + n].tolist() == pytest.approx(r.logprobs, abs=1e-6)
            assert batch.response_lens[i] == n
            assert batch.truncated[i] == (r.finish_reason == "length")
            # Log-probs against transformers on the Megatron weights, at the sampling temperature.
            ref = hf_logprobs(hf, r.prompt_ids, r.response_ids, SAMPLING["temperature"])
            gaps += [abs(a - b) for a, b in zip(r.logprobs, ref)]
            old_vs_hf += [abs(a - b) for a, b in zip(owner["old_logprobs"][i, p:p + n].tolist(), ref)]
            diff_sum += sum(abs(a - b) for a, b in zip(r.logprobs, owner["old_logprobs"][i, p:p + n].tolist()))
            diff_tokens += n

    # Truncation: really cut at MAX_LEN (a stop token ends the others).
    cut = sum(r.truncated for r in everything)
    assert 0 < cut < len(everything)
    for r in everything:
        if r.truncated:
            assert len(r.response_ids) == MAX_LEN
        else:
            assert r.response_ids[-1] in SAMPLING["stop_token_ids"]
    assert metrics["rollout/truncated_frac"] == cut / len(everything)
    lens = [len(r.response_ids) for r in everything]
    assert metrics["rollout/response_len_mean"] == pytest.approx(sum(lens) / len(lens))
    assert metrics["rollout/generated_tokens"] == sum(lens) == diff_tokens

    # Weight sync: the whole fp32 model went into vLLM.
    hf_start = transformers.Qwen2ForCausalLM.from_pretrained(hf_dir)
    assert metrics["rollout/sync_bytes"] == sum(t.numel() * 4 for t in hf_start.state_dict().values())
    assert metrics["rollout/sync_seconds"] > 0 and metrics["rollout/sync_gb_per_s"] > 0
    assert metrics["rollout/generate_seconds"] > 0

    # rollout/logprob_diff is vLLM vs Megatron over the returned batches, token-weighted over DP
    # (recomputed here from the tensors), small, and of the size of vLLM vs transformers.
    expected = sum(gaps) / len(gaps)
    print(f"logprob_diff {metrics['rollout/logprob_diff']:.3e}, vLLM vs HF {expected:.3e}, "
          f"max |old - HF| {max(old_vs_hf):.3e} over {len(gaps)} tokens, "
          f"stale engine {results[0]['stale']['rollout/logprob_diff']:.3e}")
    assert metrics["rollout/logprob_diff"] == pytest.approx(diff_sum / diff_tokens, rel=1e-6, abs=1e-12)
    assert 0 < metrics["rollout/logprob_diff"] < 1e-3
    assert metrics["rollout/logprob_diff"] == pytest.approx(expected, abs=1e-5)
    assert max(old_vs_hf) < 1e-4
    # An engine that did not receive the new weights shows up.
    assert results[0]["stale"]["rollout/logprob_diff"] > 0.05


def _without_engine(rank, world_size):
    from megatron_lead.policy.parallel import init_parallel
    from megatron_lead.rollout.engine import SamplingConfig
    from megatron_lead.rollout.step import rollout_step

    init_parallel(2, 1)
    try:
        rollout_step(None, None, None, [[1, 2, 3]], SamplingConfig(n=2), pad_id=0)
    except ValueError as e:
        return str(e)
    return None


def test_missing_engine_fails_on_every_rank():
    # Without the collective check only the rank missing an engine would raise and the other
    # would wait in a collective.
    messages = run_local(_without_engine, 2, timeout=120)
    assert all(m and "every trainer rank needs a rollout engine; missing on rank 0, rank 1" in m
               for m in messages)
