"""HF <-> Megatron conversion (single process): bit-exact round trips at TP=2 x PP=2, shard
contents against hand-built expectations, the HF writer's sharding, and one-line errors."""

import json
import os

import pytest
import torch

VOCAB = 250  # padded to 256 for Megatron


def _tiny_hf(path, family="qwen2", tied=False, dtype=torch.float32):
    import transformers

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  tie_word_embeddings=tied)
    if family == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(rope_theta=1e6, **common))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(rope_theta=500000.0, **common))
    with torch.no_grad():  # every tensor distinct (norms/biases start as 1 / 0)
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    model.to(dtype).save_pretrained(path)
    return path


def _tensors(path):
    from megatron_lead.policy.convert.hf_io import iter_hf_folder

    return dict(iter_hf_folder(path))


@pytest.mark.parametrize("family,tied,dtype", [
    ("qwen2", False, torch.float32),
    ("qwen2", True, torch.bfloat16),
    ("llama", False, torch.float32),
])
def test_round_trip_is_bit_exact(tmp_path, family, tied, dtype):
    from megatron_lead.policy.convert.checkpoint import hf_to_megatron, megatron_to_hf

    hf = _tiny_hf(str(tmp_path / "hf"), family, tied, dtype)
    hf_to_megatron(hf, str(tmp_path / "meg"), tp=2, pp=2)
    megatron_to_hf(str(tmp_path / "meg"), str(tmp_path / "back"))

    original, back = _tensors(hf), _tensors(str(tmp_path / "back"))
    assert sorted(original) == sorted(back)
    assert ("lm_head.weight" in back) == (not tied)
    for name, t in original.items():
        assert back[name].dtype == dtype and torch.equal(back[name], t), name
    for name in ("config.json", "generation_config.json"):
        with open(os.path.join(hf, name)) as a, open(tmp_path / "back" / name) as b:
            assert a.read() == b.read()


def test_shards_hold_the_expected_slices(tmp_path):
    from safetensors.torch import load_file

    from megatron_lead.policy.convert.checkpoint import hf_to_megatron, read_meta, shard_file

    hf = _tiny_hf(str(tmp_path / "hf"), "qwen2", tied=True)
    hf_to_megatron(hf, str(tmp_path / "meg"), tp=2, pp=2)
    meta = read_meta(str(tmp_path / "meg"))
    assert (meta["tp"], meta["pp"], meta["padded_vocab_size"], meta["family"]) == (2, 2, 256, "qwen2")
    src = _tensors(hf)
    # TP rank 1 of stage 1: global layer 2 is its local layer 0.
    shard = load_file(str(tmp_path / "meg" / shard_file(1, 1)))
    layer = "model.layers.2."
    q, k, v = (src[layer + f"self_attn.{x}_proj.weight"] for x in "qkv")
    hd = 16  # 64 hidden / 4 heads; 2 KV groups of 2 query heads, one group per TP rank
    # Group 1 = query heads 2 and 3, then KV head 1's k and v rows.
    expected_qkv = torch.cat([q[2 * hd:4 * hd], k[hd:2 * hd], v[hd:2 * hd]])
    assert torch.equal(shard["decoder.layers.0.self_attention.linear_qkv.weight"], expected_qkv)
    qb, kb, vb = (src[layer + f"self_attn.{x}_proj.bias"] for x in "qkv")
    assert torch.equal(shard["decoder.layers.0.self_attention.linear_qkv.bias"],
                       torch.cat([qb[2 * hd:4 * hd], kb[hd:2 * hd], vb[hd:2 * hd]]))
    assert torch.equal(shard["decoder.layers.0.self_attention.linear_proj.weight"],
                       src[layer + "self_attn.o_proj.weight"][:, 32:64])
    assert torch.equal(shard["decoder.layers.0.mlp.linear_fc1.weight"],
                       torch.cat([src[layer + "mlp.gate_proj.weight"][48:96],
                                  src[layer + "mlp.up_proj.weight"][48:96]]))
    assert torch.equal(shard["decoder.layers.0.mlp.linear_fc2.weight"],
                       src[layer + "mlp.down_proj.weight"][:, 48:96])
    assert torch.equal(shard["decoder.layers.0.input_layernorm.weight"],
                       src[layer + "input_layernorm.weight"])
    assert torch.equal(shard["decoder.final_layernorm.weight"], src["model.norm.weight"])
    # Tied, PP > 1: the last stage holds its own copy of the (padded) embedding shard.
    out = shard["output_layer.weight"]
    assert out.shape == (128, 64)
    assert torch.equal(out[:VOCAB - 128], src["model.embed_tokens.weight"][128:])
    assert not out[VOCAB - 128:].any()
    first = load_file(str(tmp_path / "meg" / shard_file(1, 0)))
    assert torch.equal(first["embedding.word_embeddings.weight"], out)
    assert "output_layer.weight" not in first and "decoder.layers.2.mlp.linear_fc1.weight" not in first


def test_hf_writer_shards_and_indexes(tmp_path):
    from megatron_lead.policy.convert.hf_io import iter_hf_folder, write_hf_folder

    hf = _tiny_hf(str(tmp_path / "hf"), "llama")
    write_hf_folder(iter_hf_folder(hf), str(tmp_path / "out"), side_files_dir=hf, max_shard_bytes=100_000)
    files = sorted(os.listdir(tmp_path / "out"))
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    with open(tmp_path / "out" / "model.safetensors.index.json") as f:
        index = json.load(f)
    original, written = _tensors(hf), _tensors(str(tmp_path / "out"))
    assert sorted(index["weight_map"]) == sorted(original) == sorted(written)
    assert all(torch.equal(original[n], written[n]) for n in original)
    assert "config.json" in files and not any(f.startswith(".") for f in os.listdir(tmp_path))


def test_bad_input_gives_one_line_errors(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    from megatron_lead import cli
    from megatron_lead.policy.convert.arch import arch_from_hf
    from megatron_lead.policy.convert.checkpoint import hf_to_megatron, megatron_to_hf, shard_file

    def error(fn):
        with pytest.raises(ValueError) as e:
            fn()
        assert "\n" not in str(e.value)
        return str(e.value)

    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"],
                                                  "model_type": "gpt2", "vocab_size": 10}))
    assert "unsupported architecture 'GPT2LMHeadModel'" in error(
        lambda: hf_to_megatron(str(gpt2), str(tmp_path / "x"), 1, 1))

    hf = _tiny_hf(str(tmp_path / "hf"), "qwen2")
    assert "tp=3 does not divide num_attention_heads=4" in error(
        lambda: hf_to_megatron(hf, str(tmp_path / "x"), tp=3, pp=1))
    assert "pp=3 does not divide num_hidden_layers=4" in error(
        lambda: hf_to_megatron(hf, str(tmp_path / "x"), tp=1, pp=3))
    llama = json.load(open(os.path.join(hf, "config.json")))
    llama.update(architectures=["LlamaForCausalLM"], rope_parameters={
        "rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 2.0})
    assert "low_freq_factor=2.0 is not supported" in error(lambda: arch_from_hf(llama))
    del llama["hidden_size"]
    assert "config has no 'hidden_size'" in error(lambda: arch_from_hf(llama))

    # An HF folder missing one tensor: named, and no half-written output is left behind.
    holed = tmp_path / "holed"
    holed.mkdir()
    (holed / "config.json").write_text(open(os.path.join(hf, "config.json")).read())
    tensors = load_file(os.path.join(hf, "model.safetensors"))
    del tensors["model.layers.3.self_attn.k_proj.bias"]
    save_file(tensors, str(holed / "model.safetensors"))
    assert "missing tensor 'model.layers.3.self_attn.k_proj.bias'" in error(
        lambda: hf_to_megatron(str(holed), str(tmp_path / "out"), tp=2, pp=2))
    assert not (tmp_path / "out").exists() and not any(
        f.startswith(".out") for f in os.listdir(tmp_path))

    # A Megatron checkpoint missing one tensor.
    hf_to_megatron(hf, str(tmp_path / "meg"), tp=2, pp=2)
    shard = str(tmp_path / "meg" / shard_file(0, 1))
    tensors = load_file(shard)
    del tensors["decoder.final_layernorm.weight"]
    save_file(tensors, shard)
    assert "missing tensor 'decoder.final_layernorm.weight' in model_tp0_pp1.safetensors" in error(
        lambda: megatron_to_hf(str(tmp_path / "meg"), str(tmp_path / "back")))

    # The CLI prints such errors as one line and returns 2.
    capsys.readouterr()
    rc = cli.main(["convert", "hf-to-megatron", "--hf", str(gpt2), "--out", str(tmp_path / "y"),
                   "--tp", "2"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith(
        "megatron-lead convert: error: unsupported architecture 'GPT2LMHeadModel'")


def test_cli_converts_both_ways(tmp_path, capsys):
    from megatron_lead import cli

    hf = _tiny_hf(str(tmp_path / "hf"), "llama", tied=True)
    assert cli.main(["convert", "hf-to-megatron", "--hf", hf, "--out", str(tmp_path / "meg"),
                     "--tp", "2", "--pp", "2"]) == 0
    assert cli.main(["convert", "megatron-to-hf", "--megatron", str(tmp_path / "meg"),
                     "--out", str(tmp_path / "back")]) == 0
    assert "wrote tp=2 pp=2 Megatron checkpoint" in capsys.readouterr().out
    original, back = _tensors(hf), _tensors(str(tmp_path / "back"))
    assert sorted(original) == sorted(back) and all(torch.equal(original[k], back[k]) for k in original)
    # Refuses to overwrite without --overwrite (one line, exit 2).
    assert cli.main(["convert", "megatron-to-hf", "--megatron", str(tmp_path / "meg"),
                     "--out", str(tmp_path / "back")]) == 2
    assert "exists and is not empty" in capsys.readouterr().err


def _save_fails_on_rank0(rank, world_size, hf_dir, bad_out):
    from megatron_lead.policy.convert.checkpoint import save_megatron_checkpoint
    from megatron_lead.policy.convert.gather import save_hf_checkpoint
    from megatron_lead.policy.model import build_model
    from megatron_lead.policy.parallel import init_parallel

    init_parallel(2, 1)
    model = build_model(hf_dir)
    raised = []
    for save in (save_hf_checkpoint, save_megatron_checkpoint):
        try:
            save(model, bad_out)
            raised.append(None)
        except (OSError, RuntimeError) as e:
            raised.append(f"{type(e).__name__}: {e}")
    return raised


def test_failed_save_fails_on_every_rank_instead_of_hanging(tmp_path):
    from megatron_lead.launch import run_local

    hf_dir = _tiny_hf(str(tmp_path / "hf"))
    (tmp_path / "a_file").write_text("x")
    bad_out = str(tmp_path / "a_file" / "export")  # its parent is a file: rank 0 cannot write
    (hf0, meg0), (hf1, meg1) = run_local(_save_fails_on_rank0, 2, hf_dir, bad_out, timeout=120)
    # HF export: rank 0 gets the OS error (makedirs on a file), rank 1 "failed on rank 0"
    assert hf0.startswith("FileExistsError") and hf1.startswith("RuntimeError") and "rank 0" in hf1
    # Megatron checkpoint: rank 0 cannot create its temp folder; both ranks raise, none hangs
    for msg in (meg0, meg1):
        assert msg.startswith("OSError: saving checkpoint") and "rank 0: " in msg
