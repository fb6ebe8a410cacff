"""`megatron-lead plan` without Megatron or vLLM: model sizes against the published ones, Megatron's
DDP buffer rules on a hand-worked example, the KV cache's block rounding, the micro-batch search,
the ranking, the CLI, the line `train` prints, and the recipes' memory comments (re-planned here).

The checks against real tensors (Megatron's buffers, saved activations, vLLM's block accounting)
are in tests/test_plan_measure.py.
"""

import contextlib
import io
import json
import re
import shlex
import shutil
from pathlib import Path

import pytest

from megatron_lead.cli import main
from megatron_lead.plan import memory as M
from megatron_lead.plan import planner as P
from megatron_lead.plan import report as R
from megatron_lead.plan.config import estimate_for_train_config
from megatron_lead.plan.shapes import ParamTensor, load_shape, megatron_params, vllm_weight_bytes

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "plan"
R1_15B = FIXTURES / "deepseek-r1-distill-qwen-1.5b.json"
QWEN_7B = FIXTURES / "qwen2.5-7b-instruct.json"
QWEN3_30B_A3B = FIXTURES / "qwen3-30b-a3b.json"
QWEN3_8B = FIXTURES / "qwen3-8b.json"
RECIPES = {"r1_distill_qwen_1.5b.yaml": (R1_15B, 1, "l40s"), "qwen2.5_7b_2node.yaml": (QWEN_7B, 2, "h100")}


def _run(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


def test_model_sizes_are_the_published_ones():
    # Hugging Face's model cards: Qwen2.5-7B(-Instruct) 7,615,616,512 parameters; the 1.5B distill
    # is Qwen2.5-1.5B (1,543,714,304, tied) with an untied LM head of 151,936 x 1,536.
    assert load_shape(QWEN_7B).num_params == 7_615_616_512
    assert load_shape(R1_15B).num_params == 1_543_714_304 + 151_936 * 1_536
    # Megatron's shards add up to the model, norms counted once per TP rank (replicated) and the
    # vocabulary padded to a multiple of 128 x TP (152,064 = 297 x 512: no padding at TP=4).
    shape = load_shape(QWEN_7B)
    norms_per_rank = (2 * 28 + 1) * 3584
    shards = sum(p.numel for p in megatron_params(shape, 4, 1, 0)) * 4
    assert shards == 7_615_616_512 + 3 * norms_per_rank


def test_qwen3_sizes_are_the_published_ones():
    # Qwen's model cards: Qwen3-30B-A3B has 30.5B parameters, 3.3B activated, 29.9B non-embedding;
    # Qwen3-8B 8.2B, 6.95B non-embedding. Counted by hand from the published architecture (the
    # fixtures' config.json): q, k, v, o projections (no bias), the q/k norms of head_dim, two norms,
    # then 128 SwiGLU experts of 768 and the router, or a dense SwiGLU of 12,288. transformers'
    # own models on the meta device count the same: 30,532,122,624 and 8,190,735,360.
    moe, dense = load_shape(QWEN3_30B_A3B), load_shape(QWEN3_8B)
    attention = 2048 * (32 + 2 * 4) * 128 + 32 * 128 * 2048 + 2 * 128
    expert = 3 * 768 * 2048
    embeddings = 2 * 151_936 * 2048  # untied: embedding and LM head
    total = 48 * (attention + 2 * 2048 + 128 * 2048 + 128 * expert) + 2048 + embeddings
    assert moe.num_params == total == 30_532_122_624
    assert moe.active_params == total - 48 * (128 - 8) * expert == 3_353_032_704
    # 3.35B activated (the embedding, the LM head and 8 of 128 experts per layer): the card's 3.3B cuts it.
    assert (round(total / 1e9, 1), int(moe.active_params / 1e8) / 10, round((total - embeddings) / 1e9, 1)) == (
        30.5, 3.3, 29.9)
    attention = 4096 * (32 + 2 * 8) * 128 + 32 * 128 * 4096 + 2 * 128
    total = 36 * (attention + 2 * 4096 + 3 * 12_288 * 4096) + 4096 + 2 * 151_936 * 4096
    assert dense.num_params == dense.active_params == total == 8_190_735_360
    assert round(total / 1e9, 1) == 8.2 and round((total - 2 * 151_936 * 4096) / 1e9, 2) == 6.95
    # Megatron at EP=8: the dense part on every rank, 16 of the 128 experts each (151,936 = 1,187 x 128:
    # no vocabulary padding at TP=1); the experts' tensors are the ones DDP keeps apart.
    params = megatron_params(moe, 1, 1, 0, ep=8)
    experts = sum(p.numel for p in params if p.expert_parallel)
    assert experts == 48 * 16 * expert
    assert sum(p.numel for p in params) - experts + 8 * experts == moe.num_params
    assert not any(p.expert_parallel for p in megatron_params(moe, 1, 1, 0, ep=1))
    # vLLM at TP=1 holds the HF model (151,936 is a multiple of 64: no padding), in bf16.
    assert vllm_weight_bytes(moe, 1) == 2 * moe.num_params and vllm_weight_bytes(dense, 1) == 2 * dense.num_params


def test_ddp_layout_follows_megatrons_padding_and_buckets():
    # Megatron walks the params backwards; with the distributed optimizer each starts at a multiple
    # of 64 elements, a shared embedding closes the bucket before it and gets its own, and buckets end
    # at a multiple of lcm(DP, 128). Worked by hand for DP=2:
    #   w2 [0, 70), w1 [128, 228), bucket 0 = [0, 256); embedding [256, 1256), bucket 1 = [256, 1280).
    params = [ParamTensor("emb", 1000, shared_embedding=True), ParamTensor("w1", 100), ParamTensor("w2", 70)]
    layout = M.ddp_layout(params, dp=2, distributed=True)
    assert layout.param_ranges == [(256, 1256), (128, 228), (0, 70)]
    assert layout.buckets == [(0, 256), (256, 1280)] and layout.numel == 1280
    # Rank 0 owns [0, 128) and [256, 768): w2 and 512 of the embedding; rank 1 the rest.
    assert [M.shard_elements(layout, 2, r) for r in (0, 1)] == [70 + 512, 100 + 488]
    plain = M.ddp_layout(params, dp=2, distributed=False)
    assert plain.numel == 1170 and plain.buckets == [(0, 1170)]


def test_kv_cache_rounds_each_sequence_to_blocks():
    shape = load_shape(QWEN_7B)
    # K and V x 28 layers x (4 KV heads / vLLM TP 2) x 128 x 2 bytes.
    assert M.kv_cache(shape, 2, 1, 1, block_size=16).bytes_per_token == 2 * 28 * 2 * 128 * 2
    kv = M.kv_cache(shape, 2, 128, 9025, block_size=16)
    assert kv.blocks_per_sequence == 565  # 9,025 tokens: 564 full blocks and one more
    assert kv.bytes == (128 * 565 + 1) * 16 * 28672  # + vLLM's null block
    # vLLM TP beyond the KV heads replicates them: TP 8 keeps one head per rank, as TP 4 does.
    assert M.kv_cache(shape, 8, 1, 16).bytes == M.kv_cache(shape, 4, 1, 16).bytes


def test_largest_micro_batch_is_the_largest_that_fits():
    shape = load_shape(R1_15B)
    w = P.Workload(pack_sequences=True)
    cluster = P.Cluster(nodes=1, gpus_per_node=8, gpu_memory_gib=44.4)
    layout = P.Layout(1, 1, 8, 1, True, True)
    best = P.best_micro_batch(shape, w, cluster, layout)
    assert best.fits and best.micro.max_tokens % P.PACK_ROUNDING == 0 and best.micro.max_tokens >= w.max_len
    bigger = P.evaluate(shape, w, cluster, layout, P.MicroBatch(True, 1, best.micro.max_tokens + P.PACK_ROUNDING))
    assert bigger.training.total > cluster.usable
    # Padded micro-batches of 2 full-length rollouts (the 1.5B recipe before the planner) do not fit an
    # L40S: the activations alone double.
    padded = P.evaluate(shape, P.Workload(micro_batch_size=2), cluster, layout, P.MicroBatch(False, 2))
    assert not padded.fits and padded.problem.startswith("training needs")


def test_layouts_are_ranked_and_rejections_say_why():
    shape = load_shape(QWEN_7B)
    cluster = P.Cluster(nodes=2, gpus_per_node=8, gpu_memory_gib=79.1)
    fits, rejected = P.plan(shape, P.Workload(pack_sequences=True), cluster)
    assert fits and rejected
    keys = [(e.layout.tp * e.layout.pp, -e.micro.worst(9024).tokens) for e in fits]
    assert keys == sorted(keys)
    assert all(e.layout.tp <= 8 and 28 % e.layout.tp == 0 and 28 % e.layout.pp == 0 for e in fits + rejected)
    # TP=1 holds 7.6B params' weights, fp32 gradients and a 9k-token micro-batch's activations: no.
    tp1 = [e for e in rejected if e.layout.tp == 1 and e.layout.pp == 1]
    assert tp1 and all(re.match(r"training needs [\d.]+ GiB with a 9,024-token micro-batch, [\d.]+ GiB over", e.problem)
                       for e in tp1)


def test_plan_command_prints_the_table_and_json():
    rc, out, _ = _run(["plan", "--model", str(QWEN_7B), "--nodes", "2", "--gpu-memory-gb", "h100", "--pack",
                       "--top", "3"])
    assert rc == 0
    assert "layouts that fit" in out and "layouts that do not fit" in out and "its keys (YAML):" in out
    assert "  tensor_model_parallel_size: 2" in out  # TP=2 is the fewest ranks that fit
    rc, out, _ = _run(["plan", "--model", str(QWEN_7B), "--nodes", "2", "--pack", "--json"])
    data = json.loads(out)
    first = data["fits"][0]
    assert first["fits"] and first["training"]["peak_bytes"] <= first["usable_bytes"]
    assert sum(t["bytes"] for t in first["training"]["terms"]) == first["training"]["peak_bytes"]
    assert data["rejected"] and all(r["problem"] for r in data["rejected"])


def test_plan_errors_are_one_line(tmp_path):
    rc, _, err = _run(["plan", "--model", str(QWEN_7B), "--gpu-memory-gb", "banana"])
    assert rc == 2 and err.count("\n") == 1 and "neither a number of GiB nor one of" in err
    rc, _, err = _run(["plan", "--model", str(tmp_path / "nothing")])
    assert rc == 2 and err.count("\n") == 1 and "no such file or folder" in err


def _recipe(name):
    return (ROOT / "examples" / "recipes" / name).read_text()


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_memory_comment_is_the_planners_output(name):
    text = _recipe(name)
    lines = text.splitlines()
    start = lines.index("#   Memory per GPU, from the planner (docs/PLAN.md explains every term):")
    command = lines[start + 1].lstrip("#").strip()
    model, nodes, gpu = RECIPES[name]
    assert command == (f"megatron-lead plan --config examples/recipes/{name} --model "
                       f"{model.relative_to(ROOT)} --nodes {nodes} --gpus-per-node 8 --gpu-memory-gb {gpu}")
    with contextlib.chdir(ROOT):
        rc, out, _ = _run(shlex.split(command)[1:] + ["--comment"])
    assert rc == 0
    block = out.rstrip("\n").splitlines()
    assert lines[start:start + len(block)] == block  # the recipe says exactly what the planner says
    assert ": fits;" in block[-1]


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipes_fit_their_gpus_with_the_planners_utilization(name):
    from dataclasses import replace

    from megatron_lead.plan.config import config_layout, workload_from_config
    from megatron_lead.trainer.config import load_config

    model, nodes, gpu = RECIPES[name]
    cfg = load_config(str(ROOT / "examples" / "recipes" / name))
    shape = load_shape(model)
    w = workload_from_config(cfg)
    cluster = P.Cluster(nodes=nodes, gpus_per_node=8, gpu_memory_gib={"l40s": 44.4, "h100": 79.1}[gpu])
    layout, micro, problem = config_layout(cfg, shape, w, cluster.world)
    assert not problem and w.pack_sequences and w.max_tokens_per_micro_batch >= w.max_len
    est = P.evaluate(shape, w, cluster, layout, micro)
    assert est.fits and est.training.total <= cluster.usable and est.generation.total <= cluster.usable
    planned = P.evaluate(shape, replace(w, gpu_memory_utilization=None), cluster, layout, micro)
    assert cfg.rollout.gpu_memory_utilization == planned.gpu_memory_utilization
    assert est.kv_planned >= est.kv_needed  # every sequence of a replica at once


def test_print_config_needs_no_gpus_and_the_run_checks_the_world_size(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):  # set by in-process tests before this one
        monkeypatch.delenv(var, raising=False)
    recipe = str(ROOT / "examples" / "recipes" / "qwen2.5_7b_2node.yaml")
    rc, out, _ = _run(["train", "--config", recipe, "--print-config"])
    assert rc == 0 and "tensor_model_parallel_size: 4" in out
    rc, _, err = _run(["train", "--config", recipe])
    assert rc == 2 and "world size 1 is not a multiple of tensor_model_parallel_size" in err


def test_train_estimate_line(tmp_path):
    from megatron_lead.trainer.config import load_config

    model = tmp_path / "model"
    model.mkdir()
    shutil.copy(R1_15B, model / "config.json")
    cfg = load_config(str(ROOT / "examples" / "recipes" / "r1_distill_qwen_1.5b.yaml"), [f"model.path={model}"])
    line, fits = estimate_for_train_config(cfg, 8, 44.4)
    assert fits and line.startswith("plan: TP=1 PP=1 DP=8") and "fits with" in line and "\n" not in line
    line, fits = estimate_for_train_config(cfg, 8, 24.0)
    assert not fits and "does not fit: training needs" in line
    line, fits = estimate_for_train_config(cfg, 8, None)
    assert fits and line.endswith("(no GPU here: not checked)")
    cfg.parallel.tensor_model_parallel_size = 4
    cfg.parallel.pipeline_model_parallel_size = 3  # 4 x 3 does not divide 8 GPUs
    line, fits = estimate_for_train_config(cfg, 8, 44.4)
    assert fits and line.startswith("plan: no estimate (parallel: world size 8 is not a multiple")
    cfg.model.path = str(tmp_path / "missing")
    line, fits = estimate_for_train_config(cfg, 8, 44.4)
    assert fits and line.startswith("plan: no estimate (") and "config.json" in line


def test_train_prints_the_estimate_and_stops_on_a_gpu_too_small(tmp_path, monkeypatch, capsys):
    """trainer/loop._check_memory_plan: the line on CPU; on a (faked) 24 GiB GPU the 1.5B recipe
    does not fit and every rank stops with that one line before anything is allocated."""
    import types

    import torch

    from megatron_lead.trainer.config import load_config
    from megatron_lead.trainer.loop import _check_memory_plan

    (tmp_path / "model").mkdir()
    shutil.copy(R1_15B, tmp_path / "model" / "config.json")
    cfg = load_config(str(ROOT / "examples" / "recipes" / "r1_distill_qwen_1.5b.yaml"),
                      [f"model.path={tmp_path / 'model'}"])
    _check_memory_plan(cfg, 8)
    line = capsys.readouterr().out.strip()
    assert line.startswith("plan: ") and line.endswith("(no GPU here: not checked)")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: types.SimpleNamespace(total_memory=24 << 30))
    with pytest.raises(ValueError) as err:
        _check_memory_plan(cfg, 8)
    assert "does not fit" in str(err.value) and "\n" not in str(err.value)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: types.SimpleNamespace(total_memory=80 << 30))
    _check_memory_plan(cfg, 8)
    assert "fits with" in capsys.readouterr().out


def test_moe_layouts_add_expert_parallelism_and_say_what_train_cannot_run():
    shape, cluster = load_shape(QWEN3_30B_A3B), P.Cluster(nodes=2, gpus_per_node=8)
    w = P.Workload(pack_sequences=True, max_response_len=3000)
    layouts = P.candidate_layouts(shape, w, cluster)
    # TP=1 only (the trainer refuses MoE training at TP > 1); every EP dividing DP and the 128 experts.
    assert {lay.tp for lay in layouts} == {1}
    by_pp = {}
    for lay in layouts:
        by_pp.setdefault((lay.pp, lay.dp), set()).add(lay.ep)
    assert by_pp == {(1, 16): {1, 2, 4, 8, 16}, (2, 8): {1, 2, 4, 8}, (4, 4): {1, 2, 4}, (8, 2): {1, 2},
                     (16, 1): {1}}
    assert {lay.ep for lay in P.candidate_layouts(load_shape(QWEN_7B), w, cluster)} == {1}
    fits, _ = P.plan(shape, w, cluster)
    notes = [bool(e.note) for e in fits]
    assert notes == sorted(notes) and any(notes) and not notes[0]  # what train runs first, EP > 1 after
    assert all(e.note.startswith(f"EP={e.layout.ep}: for planning and conversion") for e in fits if e.layout.ep > 1)
    ep = next(e for e in fits if e.layout.ep > 1)
    assert f"  # expert parallelism EP={ep.layout.ep}: no train key yet" in "\n".join(R.yaml_keys(ep, w))
    # The experts' optimizer state is sharded over DP / EP: at PP=2 the rank's share of all of it is
    # the same at EP=1 and EP=8 (16 experts whole against 128 experts' 1/8), its weights are not.
    states = {e: M.train_state(shape, 1, 2, 0, 8, M.Precision(), ep=e) for e in (1, 8)}
    assert states[8].weights < states[1].weights / 4
    assert states[8].optimizer == pytest.approx(states[1].optimizer, rel=1e-3)
    with pytest.raises(ValueError, match="EP=3 does not divide DP=8"):
        M.train_state(shape, 1, 2, 0, 8, M.Precision(), ep=3)


def test_moe_activations_follow_the_routed_rows():
    # A MoE layer saves, per token, its routed rows' tensors: top-k of them, whatever the number of
    # experts (a dense model of the experts' total width would save 128 / 8 times more), and with
    # EP > 1 the imbalance allowance on them alone.
    shape = load_shape(QWEN3_30B_A3B)
    kernels = M.KERNELS["gpu"]
    one = M.layer_saved(shape, 1, kernels, packed=True)
    wide = load_shape({**json.loads(QWEN3_30B_A3B.read_text()), "num_experts": 256})
    assert M.layer_saved(wide, 1, kernels, packed=True)["experts"] == one["experts"]
    assert one["experts"] == 8 * (2048 * 2 + 3 * 768 * 2 + 4)  # input, fc1 output, SwiGLU output, routing weight
    top4 = load_shape({**json.loads(QWEN3_30B_A3B.read_text()), "num_experts_per_tok": 4})
    assert M.layer_saved(top4, 1, kernels, packed=True)["experts"] * 2 == one["experts"]
    ep = M.layer_saved(shape, 1, kernels, packed=True, ep=4)
    assert ep["experts"] == M.MOE_EP_IMBALANCE * one["experts"] and ep["attention"] == one["attention"]
    assert "mlp" not in one and "mlp" in M.layer_saved(load_shape(QWEN3_8B), 1, kernels, packed=True)


def test_qwen3_30b_a3b_on_two_h100_nodes_is_what_docs_plan_md_says():
    shape, cluster = load_shape(QWEN3_30B_A3B), P.Cluster(nodes=2, gpus_per_node=8, gpu_memory_gib=79.1)
    # The 7B recipe's workload (1,024 + 8,000 tokens): nothing fits; a 9,024-token rollout's activations
    # alone are ~50 GiB on the first pipeline stage, and the closest layout needs ~92 GiB.
    fits, rejected = P.plan(shape, P.Workload(pack_sequences=True), cluster)
    assert not fits
    closest = min(rejected, key=lambda e: e.training.total)
    assert (closest.layout.pp, closest.layout.ep) == (16, 1) and 88 < closest.training.total / M.GIB < 96
    # 1,024 + 3,000 tokens: TP=1 PP=8 DP=2 first (train runs it), micro-batches packed up to 4,608 tokens.
    w = P.Workload(pack_sequences=True, max_response_len=3000)
    fits, _ = P.plan(shape, w, cluster)
    best = fits[0]
    assert (best.layout.tp, best.layout.pp, best.layout.dp, best.layout.ep, best.layout.vllm_tp) == (1, 8, 2, 1, 2)
    assert best.micro.max_tokens == 4608 and not best.note
    doc = (ROOT / "docs" / "PLAN.md").read_text()
    assert "TP=1 PP=8 DP=2 vLLM-TP=2 dist-opt offload; packed <= 4,608 tokens" in doc
    rc, out, _ = _run(["plan", "--model", str(QWEN3_30B_A3B), "--nodes", "2", "--gpu-memory-gb", "h100", "--pack",
                       "--max-response-len", "3000", "--top", "60"])
    assert rc == 0 and "3.35B active per token" in out and "plan/convert only" in out


def test_sliding_window_and_moe_tp_are_refused_in_one_line(tmp_path):
    mistral = dict(architectures=["MistralForCausalLM"], vocab_size=32768, hidden_size=4096, intermediate_size=14336,
                   num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                   sliding_window=4096, max_position_embeddings=32768)
    (tmp_path / "config.json").write_text(json.dumps(mistral))
    rc, _, err = _run(["plan", "--model", str(tmp_path / "config.json"), "--nodes", "1"])
    assert rc == 2 and err.count("\n") == 1 and "9,024 tokens is longer than this mistral model's sliding_window=4,096" \
        in err
    rc, out, _ = _run(["plan", "--model", str(tmp_path / "config.json"), "--max-response-len", "3000", "--top", "1"])
    assert rc == 0 and "layouts that fit" in out
    from megatron_lead.plan.config import config_layout
    from megatron_lead.trainer.config import load_config

    cfg = load_config(str(ROOT / "examples" / "recipes" / "qwen2.5_7b_2node.yaml"))
    shape = load_shape(QWEN3_30B_A3B)
    _, _, problem = config_layout(cfg, shape, P.Workload(), 16)
    assert problem.startswith("tensor_model_parallel_size=4: the trainer trains a mixture-of-experts model at TP=1")
