"""model.py against a naive cache-free reference (tests/reference.py), and the KV cache against full forwards."""

import copy
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from model import FEW_ROWS, Linear, LMHead, ModelConfig, Transformer, as_plain_linears
from tests.reference import reference_greedy, reference_logits

WEIGHTS = Path(__file__).resolve().parent.parent / "weights"
ATOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")


def toy_config(tie=False):
    return ModelConfig(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=50,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
    )


def toy_model(tie=False, seed=0):
    """A random fp32 model whose every weight (norms included) is far from its initial value."""
    torch.manual_seed(seed)
    model = Transformer(toy_config(tie))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(std=0.2)
    return model.eval()


def random_tokens(*shape, seed=1):
    return torch.randint(0, 50, shape, generator=torch.Generator().manual_seed(seed))


def close(a, b, atol=ATOL):
    return torch.allclose(a, b, atol=atol, rtol=0)


# A token tree after a prefix: root r, branch A = [a1], branch B = [b1, b2 (child of b1)].
#              r   a1  b1  b2
TREE_DEPTHS = [0, 1, 1, 2]
TREE_MASK = torch.tensor(
    [
        [1, 0, 0, 0],  # r sees itself
        [1, 1, 0, 0],  # a1 sees r
        [1, 0, 1, 0],  # b1 sees r
        [1, 0, 1, 1],
    ],
    dtype=torch.bool,
)  # b2 sees r, b1
TREE_PATHS = [[0], [0, 1], [0, 2], [0, 2, 3]]  # root path of each node, as indices into the tree


def tree_inputs(prefix_len):
    """Positions and the full [P+4, P+4] mask of prefix + tree run in one forward without a cache."""
    n = len(TREE_DEPTHS)
    mask = torch.zeros(prefix_len + n, prefix_len + n, dtype=torch.bool)
    mask[:prefix_len, :prefix_len] = torch.ones(prefix_len, prefix_len, dtype=torch.bool).tril()
    mask[prefix_len:, :prefix_len] = True
    mask[prefix_len:, prefix_len:] = TREE_MASK
    positions = torch.cat([torch.arange(prefix_len), prefix_len + torch.tensor(TREE_DEPTHS)])
    return positions, mask


# ---------------------------------------------------------------------------------------------- full forward


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@torch.no_grad()
def test_full_forward_equals_the_naive_reference(tie):
    model = toy_model(tie)
    tokens = random_tokens(2, 20)
    assert close(model(tokens), reference_logits(model, tokens))


@pytest.mark.parametrize("keep", [1, 3, 20])
@torch.no_grad()
def test_logits_to_keep_gives_the_last_rows_of_the_full_forward_and_all_hidden_states(keep):
    model, tokens = toy_model(False), random_tokens(2, 20)
    logits, hidden = model(tokens, return_hidden=True)
    kept, kept_hidden = model(tokens, return_hidden=True, logits_to_keep=keep)
    assert kept.shape[1] == keep and close(kept, logits[:, -keep:]) and torch.equal(kept_hidden, hidden)


@torch.no_grad()
def test_tied_model_shares_one_matrix_between_embedding_and_lm_head():
    model = toy_model(tie=True)
    assert model.lm_head.weight is model.embed_tokens.weight


@torch.no_grad()
def test_forward_with_explicit_positions_and_mask_equals_the_naive_reference():
    model = toy_model()
    T = 12
    tokens = random_tokens(2, T)
    positions = torch.randint(0, 64, (T,), generator=torch.Generator().manual_seed(2))
    mask = torch.rand(T, T, generator=torch.Generator().manual_seed(3)) < 0.5
    mask |= torch.eye(T, dtype=torch.bool)  # every row attends to something
    assert close(
        model(tokens, positions=positions, attn_mask=mask),
        reference_logits(model, tokens, positions=positions, mask=mask),
    )


@torch.no_grad()
def test_greedy_decoding_through_the_cache_equals_the_naive_generator():
    model = toy_model()
    prompt = random_tokens(1, 5)[0].tolist()
    cache, ids, out = model.new_cache(), torch.tensor([prompt]), []
    for _ in range(12):
        ids = model(ids, cache)[:, -1:].argmax(-1)
        out.append(int(ids))
    assert out == reference_greedy(model, prompt, 12)


@pytest.mark.parametrize("batch, rows", [(1, 1), (1, 2), (2, 3), (1, FEW_ROWS), (1, FEW_ROWS + 1), (2, 20)])
@torch.no_grad()
def test_a_projection_of_any_number_of_rows_equals_x_times_w_transposed_in_a_contiguous_layout(batch, rows):
    torch.manual_seed(0)
    linear, x = Linear(16, 24), torch.randn(batch, rows, 16)
    y = linear(x)
    assert y.shape == (batch, rows, 24) and close(y, x @ linear.weight.T)  # every row in its place
    assert y.is_contiguous()  # a transposed output would reach attention with T innermost (a slower kernel)


@pytest.mark.parametrize("batch, rows", [(1, 1), (1, 2), (2, 3), (1, FEW_ROWS), (1, FEW_ROWS + 1), (2, 20)])
@torch.no_grad()
def test_the_lm_head_gives_every_row_in_its_place_and_a_decoding_call_contiguous_logits(batch, rows):
    torch.manual_seed(0)
    head, h = LMHead(16, 40, bias=False), torch.randn(batch, rows, 16)
    logits = head(h)
    assert logits.shape == (batch, rows, 40) and close(logits, h @ head.weight.T)
    # the loops softmax and sample along the vocabulary: at stride N that was 5-7x slower (LMHead's docstring)
    assert logits.is_contiguous() == (batch * rows <= FEW_ROWS)


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@torch.no_grad()
def test_the_plain_form_of_the_model_gives_the_same_logits_from_the_same_weights(tie):
    model = toy_model(tie)
    plain = as_plain_linears(copy.deepcopy(model, memo={id(p): p for p in model.parameters()}))
    assert {type(m) for m in plain.modules() if isinstance(m, torch.nn.Linear)} == {torch.nn.Linear}
    assert plain.lm_head.weight is model.lm_head.weight  # shared, not copied
    assert (plain.lm_head.weight is plain.embed_tokens.weight) == tie  # and still tied where it was
    tokens = random_tokens(1, 3)
    assert close(plain(tokens), model(tokens))


# ------------------------------------------------------------------------------------------------ KV cache


@torch.no_grad()
def test_decoding_token_by_token_through_the_cache_equals_one_full_forward():
    model = toy_model()
    tokens = random_tokens(2, 16)
    cache = model.new_cache(batch_size=2)
    stepwise = torch.cat([model(tokens[:, t : t + 1], cache) for t in range(16)], dim=1)
    assert cache.length == 16
    assert close(stepwise, model(tokens))


@pytest.mark.parametrize("chunks", [[3, 1, 5, 2], [1, 7, 1, 2], [11]])
@torch.no_grad()
def test_decoding_in_uneven_chunks_through_the_cache_equals_one_full_forward(chunks):
    model = toy_model()
    tokens = random_tokens(2, sum(chunks))
    cache, start, pieces = model.new_cache(batch_size=2), 0, []
    for n in chunks:
        pieces.append(model(tokens[:, start : start + n], cache))
        start += n
    assert close(torch.cat(pieces, dim=1), model(tokens))


@torch.no_grad()
def test_truncate_then_decoding_other_tokens_equals_never_having_decoded_the_discarded_ones():
    model = toy_model()
    prefix, rejected, new = random_tokens(1, 6, seed=1), random_tokens(1, 4, seed=2), random_tokens(1, 3, seed=3)
    cache = model.new_cache()
    model(prefix, cache)
    model(rejected, cache)
    cache.truncate(8)  # keep the prefix and the first two rejected-block tokens
    assert cache.length == 8
    logits = model(new, cache)

    kept = torch.cat([prefix, rejected[:, :2]], dim=1)
    fresh = model.new_cache()
    model(kept, fresh)
    expected = model(new, fresh)
    assert close(logits, expected)
    assert cache.length == fresh.length == 11
    for a, b in zip(cache.k + cache.v, fresh.k + fresh.v):
        assert close(a[:, :, :11], b[:, :, :11])


def feed_prefix_then_tree(model, P: int):
    """Cache a P-token prefix, then feed the 4-node test tree through the cache with its mask and positions."""
    prefix, tree = random_tokens(1, P, seed=1), random_tokens(1, 4, seed=2)
    cache = model.new_cache()
    model(prefix, cache)
    block_mask = torch.cat([torch.ones(4, P, dtype=torch.bool), TREE_MASK], dim=1)
    logits = model(tree, cache, positions=P + torch.tensor(TREE_DEPTHS), attn_mask=block_mask)
    return prefix, tree, cache, logits


@torch.no_grad()
def test_keep_moves_the_accepted_tree_branch_into_contiguous_slots():
    model = toy_model()
    P = 5
    prefix, tree, cache, _ = feed_prefix_then_tree(model, P)
    cache.keep(P + torch.tensor([0, 2, 3]))  # accept root r and branch B = [b1, b2]
    assert cache.length == P + 3

    fresh = model.new_cache()
    model(torch.cat([prefix, tree[:, [0, 2, 3]]], dim=1), fresh)
    for a, b in zip(cache.k + cache.v, fresh.k + fresh.v):
        assert close(a[:, :, : P + 3], b[:, :, : P + 3])
    nxt = random_tokens(1, 1, seed=3)
    assert close(model(nxt, cache), model(nxt, fresh))


@torch.no_grad()
def test_a_tree_masked_forward_equals_running_each_node_root_path_as_a_plain_sequence():
    model = toy_model()
    P = 5
    prefix, tree = random_tokens(1, P, seed=1), random_tokens(1, 4, seed=2)
    positions, mask = tree_inputs(P)
    logits = model(torch.cat([prefix, tree], dim=1), positions=positions, attn_mask=mask)
    assert close(logits[:, :P], model(prefix))
    for node, path in enumerate(TREE_PATHS):
        plain = model(torch.cat([prefix, tree[:, path]], dim=1))
        assert close(logits[0, P + node], plain[0, -1])


@torch.no_grad()
def test_a_tree_masked_forward_through_the_cache_equals_running_each_node_root_path_as_a_plain_sequence():
    model = toy_model()
    P = 5
    prefix, tree, cache, logits = feed_prefix_then_tree(model, P)
    for node, path in enumerate(TREE_PATHS):
        plain = model(torch.cat([prefix, tree[:, path]], dim=1))
        assert close(logits[0, node], plain[0, -1])


@torch.no_grad()
def test_overflowing_an_explicitly_sized_cache_raises_a_value_error_and_writes_nothing():
    model = toy_model()
    cache = model.new_cache(max_len=8)
    model(random_tokens(1, 6), cache)
    with pytest.raises(ValueError, match="overflow"):
        model(random_tokens(1, 3), cache)
    assert cache.length == 6


def test_overflowing_the_default_cache_raises_a_value_error():
    model = toy_model()
    cache = model.new_cache()
    model(random_tokens(1, 64), cache)
    with pytest.raises(ValueError):
        model(random_tokens(1, 1), cache)


# --------------------------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@torch.no_grad()
def test_save_then_load_in_float32_gives_the_same_config_and_logits(tmp_path, tie):
    model = toy_model(tie)
    model.save_pretrained(tmp_path, dtype=torch.float32)
    loaded = Transformer.from_pretrained(tmp_path)
    assert loaded.config == model.config
    tokens = random_tokens(2, 20)
    assert close(loaded(tokens), model(tokens), atol=1e-6)
    if tie:
        assert loaded.lm_head.weight is loaded.embed_tokens.weight
        assert "lm_head.weight" not in load_file(tmp_path / "model.safetensors")


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@torch.no_grad()
def test_save_in_bfloat16_then_load_equals_the_model_with_bfloat16_rounded_weights(tmp_path, tie):
    model = toy_model(tie)
    model.save_pretrained(tmp_path)  # default dtype: bfloat16
    loaded = Transformer.from_pretrained(tmp_path)
    assert loaded.config == model.config
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    rounded = {k: v.to(torch.bfloat16).float() for k, v in model.state_dict().items()}
    tokens = random_tokens(2, 20)
    logits = loaded(tokens)
    assert close(logits, reference_logits(model, tokens, state=rounded))
    exact = model(tokens)
    assert (logits - exact).abs().max() < 0.05 * exact.abs().max()  # bf16 rounding moved the logits only a little


def hand_made_checkpoint(path, tie, seed=0):
    """An HF-style Llama checkpoint written without model.py: config.json as transformers writes it,
    and model.safetensors with HF tensor names, random bf16 tensors. Returns (config namespace, tensors)."""
    L, C, I, H, H_kv, V = 2, 64, 96, 4, 2, 50
    D = C // H
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "torch_dtype": "bfloat16",
        "transformers_version": "4.46.0",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "initializer_range": 0.02,
        "use_cache": True,
        "rope_scaling": None,
        "head_dim": D,
        "hidden_size": C,
        "intermediate_size": I,
        "num_hidden_layers": L,
        "num_attention_heads": H,
        "num_key_value_heads": H_kv,
        "vocab_size": V,
        "rms_norm_eps": 1e-6,
        "rope_theta": 500000.0,
        "max_position_embeddings": 64,
        "tie_word_embeddings": tie,
    }
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, mean=0.0):
        return (mean + 0.2 * torch.randn(*shape, generator=g)).to(torch.bfloat16)

    tensors = {"model.embed_tokens.weight": rand(V, C), "model.norm.weight": rand(C, mean=1.0)}
    for i in range(L):
        p = f"model.layers.{i}."
        tensors.update(
            {
                p + "self_attn.q_proj.weight": rand(H * D, C),
                p + "self_attn.k_proj.weight": rand(H_kv * D, C),
                p + "self_attn.v_proj.weight": rand(H_kv * D, C),
                p + "self_attn.o_proj.weight": rand(C, H * D),
                p + "mlp.gate_proj.weight": rand(I, C),
                p + "mlp.up_proj.weight": rand(I, C),
                p + "mlp.down_proj.weight": rand(C, I),
                p + "input_layernorm.weight": rand(C, mean=1.0),
                p + "post_attention_layernorm.weight": rand(C, mean=1.0),
            }
        )
    if not tie:
        tensors["lm_head.weight"] = rand(V, C)
    Path(path).mkdir(parents=True, exist_ok=True)
    (Path(path) / "config.json").write_text(json.dumps(config, indent=2))
    save_file(tensors, Path(path) / "model.safetensors", metadata={"format": "pt"})
    return SimpleNamespace(**config), tensors


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@torch.no_grad()
def test_a_hand_written_hf_checkpoint_loads_with_the_reference_logits(tmp_path, tie):
    config, tensors = hand_made_checkpoint(tmp_path, tie)
    model = Transformer.from_pretrained(tmp_path)
    assert model.config.rope_theta == 500000.0 and model.config.rms_norm_eps == 1e-6
    assert model.config.tie_word_embeddings == tie
    tokens = random_tokens(2, 20)
    assert close(model(tokens), reference_logits(None, tokens, config=config, state=tensors))


def test_a_config_with_rope_scaling_is_refused(tmp_path):
    hand_made_checkpoint(tmp_path, tie=False)
    raw = json.loads((tmp_path / "config.json").read_text())
    raw["rope_scaling"] = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="rope_scaling"):
        ModelConfig.from_json(tmp_path / "config.json")
    with pytest.raises(ValueError, match="rope_scaling"):
        Transformer.from_pretrained(tmp_path)


@torch.no_grad()
def test_transformers_5_rope_parameters_give_rope_theta(tmp_path):
    config, tensors = hand_made_checkpoint(tmp_path, tie=False)
    raw = json.loads((tmp_path / "config.json").read_text())
    raw["rope_parameters"] = {"rope_theta": raw.pop("rope_theta"), "rope_type": "default"}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    model = Transformer.from_pretrained(tmp_path)
    assert model.config.rope_theta == 500000.0
    tokens = random_tokens(1, 12)
    assert close(model(tokens), reference_logits(None, tokens, config=config, state=tensors))


@torch.no_grad()
def test_a_sharded_checkpoint_loads_like_the_single_file(tmp_path):
    config, tensors = hand_made_checkpoint(tmp_path / "one", tie=True)
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[:5], "model-00002-of-00002.safetensors": names[5:]}
    (tmp_path / "two").mkdir()
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, tmp_path / "two" / shard)
    index = {"weight_map": {k: shard for shard, keys in shards.items() for k in keys}}
    (tmp_path / "two" / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "two" / "config.json").write_text((tmp_path / "one" / "config.json").read_text())
    tokens = random_tokens(1, 12)
    assert torch.equal(
        Transformer.from_pretrained(tmp_path / "two")(tokens), Transformer.from_pretrained(tmp_path / "one")(tokens)
    )


@pytest.mark.parametrize(
    "change", [{"attention_bias": True}, {"mlp_bias": True}, {"hidden_act": "gelu"}], ids=["attn", "mlp", "act"]
)
def test_biases_and_other_activations_are_refused(tmp_path, change):
    hand_made_checkpoint(tmp_path, tie=False)
    raw = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**raw, **change}))
    with pytest.raises(ValueError, match=next(iter(change))):
        Transformer.from_pretrained(tmp_path)


@pytest.mark.parametrize("name", ["target", "draft"])
@torch.no_grad()
def test_the_shipped_weights_load_with_hf_names_and_give_finite_logits(name):
    path = WEIGHTS / name
    if not (path / "model.safetensors").exists():
        pytest.skip(f"{path} not shipped")
    names = set(load_file(path / "model.safetensors"))
    assert {"model.embed_tokens.weight", "model.norm.weight", "model.layers.0.self_attn.q_proj.weight"} <= names
    assert all(n.startswith(("model.", "lm_head.")) for n in names)
    model = Transformer.from_pretrained(path)
    tokens = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    logits = model(tokens)
    assert logits.shape == (1, 16, model.config.vocab_size)
    assert torch.isfinite(logits).all()
