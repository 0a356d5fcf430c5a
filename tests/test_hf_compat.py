"""Our checkpoints are Hugging Face Llama checkpoints: transformers loads them and computes the same logits.

transformers is not a project dependency but a test oracle: .ci/run installs it, and this test is skipped where it
is absent. The hand-written HF-layout checkpoint test in test_model.py covers the other direction everywhere.
"""

import pytest
import torch

from model import ModelConfig, Transformer

transformers = pytest.importorskip("transformers")


def test_our_checkpoint_loads_in_transformers_with_the_same_logits(tmp_path):
    torch.manual_seed(0)
    cfg = ModelConfig(
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=300,
        max_position_embeddings=128,
    )
    ours = Transformer(cfg)
    for p in ours.parameters():
        torch.nn.init.normal_(p, std=0.1)
    ours.save_pretrained(tmp_path, dtype=torch.float32)
    theirs = transformers.LlamaForCausalLM.from_pretrained(tmp_path, torch_dtype=torch.float32).eval()
    tokens = torch.randint(0, cfg.vocab_size, (2, 50))
    with torch.no_grad():
        assert torch.allclose(ours(tokens), theirs(tokens).logits, atol=1e-4, rtol=1e-4)
