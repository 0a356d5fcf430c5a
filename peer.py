"""The peer a user would pick: transformers' own `generate` on the same weights, for bench.py's --peer rows.

transformers loads the same Hugging Face folder our loader reads (the shipped target, or SmolLM2 as converted from
its GGUF, pretrained.py), in fp32 on the same device, and decodes the same prompts: autoregressive, its prompt
lookup (`prompt_lookup_num_tokens`, Saxena 2023, the same method as our -d pld) and assisted generation (its SpS,
Leviathan et al. 2023) with our draft model when it shares the target's tokenizer. transformers is optional here
(it is the tests' oracle): without it, --peer is refused in one line.
"""

import importlib.util
from collections.abc import Callable
from pathlib import Path

import torch

PROMPT_LOOKUP_TOKENS = 10  # transformers' documented example value, and what its users copy
PeerDecode = Callable[[list[int], int, int | None, float, int], list[int]]  # (prompt, n_new, eot, T, seed) -> ids


def transformers_missing() -> bool:
    return importlib.util.find_spec("transformers") is None


def load(folder: Path, device: str):
    """transformers' model of a Hugging Face Llama folder, fp32, in eval mode."""
    from transformers import AutoModelForCausalLM  # optional: imported only for --peer

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device).eval()


def decoder(model, **how) -> PeerDecode:
    """A decode function for bench.run: model.generate with `how` (prompt_lookup_num_tokens=..., assistant_model=...),
    greedy at T = 0, sampled above, stopping at eot or after n_new tokens."""

    @torch.inference_mode()
    def decode(prompt: list[int], n_new: int, eot: int | None, temperature: float, seed: int) -> list[int]:
        ids = torch.tensor([prompt], device=model.device)
        torch.manual_seed(seed)  # transformers samples from torch's global generator
        sampling = dict(do_sample=True, temperature=temperature, top_k=0) if temperature > 0 else dict(do_sample=False)
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n_new,
            min_new_tokens=0,
            eos_token_id=eot,
            pad_token_id=eot if eot is not None else 0,
            **sampling,
            **how,
        )
        return out[0, len(prompt) :].tolist()

    return decode


def rows(target_folder: Path, draft_folder: Path | None, device: str) -> list[tuple[str, PeerDecode]]:
    """(label, decode) of transformers' autoregressive, prompt lookup and, given a draft of the same tokenizer,
    assisted generation."""
    model = load(target_folder, device)
    out = [
        ("transformers generate (autoregressive)", decoder(model)),
        (
            f"transformers prompt lookup (prompt_lookup_num_tokens={PROMPT_LOOKUP_TOKENS})",
            decoder(model, prompt_lookup_num_tokens=PROMPT_LOOKUP_TOKENS),
        ),
    ]
    if draft_folder is not None:
        out.append(
            ("transformers assisted generation (our draft)", decoder(model, assistant_model=load(draft_folder, device)))
        )
    return out
