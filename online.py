"""Online speculative decoding (Liu et al. 2023, "Online Speculative Decoding"; survey §5.1 "independent drafting,
fine-tuned", §7 "alignment"): the draft model keeps learning DURING serving, by distillation on the target's
distributions that verification computes anyway.

    python specdec.py -p "def parse(s):" -d draft --online --compare

OnlineDrafter wraps a ModelDrafter behind the same chain interface (reset / propose / accept). Through the loop's
optional attach(target, cache, prompt) hook it wraps the verify call, so it sees the target's logits of every call
without a branch in speculative_generate. After each call it buffers (accepted text, position, p) for the position
where the draft was rejected (the paper emphasises those: where the draft is wrong, the target's p is the most
informative label), or with rows="all" for every position the call verified on the accepted path. When the buffer holds
`every` positions it takes `steps` Adam steps of forward KL(p || q) on the draft, teacher-forced on the buffered
text, and clears the buffer. The paper compares several divergences (forward and reverse KL, JSD, ...); forward KL
is the one train.py --distill (DistillSpec) already uses, and with p given it is the soft-label cross-entropy minus
a constant. The default lr (1e-5) is small on purpose: on our 8-prompt bench, 1e-4 and above lowered acceptance
(README, "Online speculative decoding").

Why this stays lossless: an update runs in accept(), after the call was verified, and the next propose() drafts
with the updated model and reports that same model's q. What is verified never depends on the update. The draft's
KV cache was built by the old weights, so it is dropped after an update and the next propose() re-reads the whole
context with the new ones (a draft forward of the context, counted in the timing like the update itself).
The model trained is a private deepcopy, so the shared loaded draft (and every other bench row) never changes. The
update draws no random numbers (full-batch Adam, fixed order), so a run reproduces from --seed alone.
"""

import copy
import time

import torch
import torch.nn.functional as F
from torch import Tensor

from drafters import KeepDrafting, ModelDrafter, Warp, always
from model import KVCache, Transformer


class Buffer:
    """Distillation data, one entry per request: (its text so far, positions t, p [n, V]); p_t is the target's
    next-token distribution (temperature 1) after text[:t + 1]."""

    def __init__(self):
        self.entries: list[tuple[list[int], list[int], list[Tensor]]] = []

    def __len__(self) -> int:
        return sum(len(positions) for _, positions, _ in self.entries)

    def add(self, text: list[int], positions: list[int], ps: list[Tensor], new_request: bool) -> None:
        if new_request or not self.entries:
            self.entries.append((list(text), list(positions), list(ps)))
        else:  # the same request: its text only grew, so earlier positions still index it
            _, old_positions, old_ps = self.entries[-1]
            self.entries[-1] = (list(text), old_positions + positions, old_ps + ps)

    def clear(self) -> None:
        self.entries = []


def distill_loss(model: Transformer, buffer: Buffer) -> Tensor:
    """Mean forward KL(p || q) over the buffered positions, q from a teacher-forced forward of the draft on each
    entry's text (one forward per request, read at its buffered positions)."""
    total, count = 0.0, 0
    device = model.device
    for text, positions, ps in buffer.entries:
        tokens = torch.tensor([text[: max(positions) + 1]], device=device)
        h = model.norm(model.blocks(model.embed_tokens(tokens))[0, positions])  # the LM head at buffered rows only
        logits = model.lm_head(h).float()  # [n, V]
        p = torch.stack(ps).to(device).float()  # a new tensor made outside inference mode: autograd may save it
        log_q = torch.log_softmax(logits, dim=-1)
        total = total + F.kl_div(log_q, p, reduction="sum")  # sum_x p (log p - log q), 0 log 0 = 0
        count += len(positions)
    return total / max(1, count)


class OnlineDrafter:
    """A ModelDrafter whose private copy of the draft model is distilled on the target's verify logits as it
    serves (OSD, Liu et al. 2023). Carry one across requests (bench.py --online) and it learns across them."""

    learns_across_generations = True  # its draft model's weights

    def __init__(
        self,
        draft: Transformer,
        lr: float = 1e-5,
        every: int = 32,
        steps: int = 4,
        rows: str = "rejected",
        **drafter_options,
    ):
        if rows not in ("rejected", "all"):
            raise ValueError(f"rows must be 'rejected' or 'all', got {rows!r}")
        self.model = copy.deepcopy(draft)  # never train the shared loaded draft in place
        self.inner = ModelDrafter(self.model, **drafter_options)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=lr)
        self.every, self.steps, self.rows = every, steps, rows
        self.buffer, self.new_request = Buffer(), True
        self.context: list[int] = []
        self.drafts: list[int] = []
        self.logits: Tensor | None = None  # the last verify call's target logits [len(drafts) + 1, V]
        self.updates, self.update_seconds, self.losses = 0, 0.0, []  # losses: KL on the buffer before each update

    def reset(self) -> None:
        self.inner.reset()
        self.new_request = True  # the buffer keeps earlier requests' positions: they are still good data

    def attach(self, target: Transformer, cache: KVCache, prompt: list[int]):
        """The loop's optional hook: we only watch the verify call, we never change it."""

        def verify_forward(tokens: Tensor, cache: KVCache, logits_to_keep: int = 0) -> Tensor:
            logits = target(tokens, cache, logits_to_keep=logits_to_keep)
            self.logits = logits[0, -len(self.drafts) - 1 :]  # the verify rows (a first call also carries the prompt)
            return logits

        return verify_forward

    def propose(
        self, context: list[int], gamma: int, warp: Warp, generator: torch.Generator | None, keep: KeepDrafting = always
    ) -> tuple[list[int], Tensor | None]:
        drafts, q = self.inner.propose(context, gamma, warp, generator, keep)  # q: the model that drew the drafts
        self.context, self.drafts = context, drafts
        return drafts, q

    def accept(self, n_accepted: int) -> None:
        self.inner.accept(n_accepted)
        if self.logits is not None:
            self.record(n_accepted)
        if len(self.buffer) >= self.every:
            self.update()

    def record(self, n: int) -> None:
        """Buffer the call's rows on the accepted path: row i is p after context + drafts[:i]. Row n is where the
        draft was rejected (or the bonus row after a full accept: no draft was wrong there)."""
        rows = list(range(n + 1)) if self.rows == "all" else [n] if n < len(self.drafts) else []
        if rows:
            text = self.context + self.drafts[:n]
            p = torch.softmax(self.logits.float(), dim=-1)  # the target's whole distribution, unwarped
            self.buffer.add(text, [len(self.context) - 1 + i for i in rows], [p[i] for i in rows], self.new_request)
            self.new_request = False
        self.logits = None

    def update(self) -> None:
        """`steps` Adam steps of forward KL on the buffer, then clear it; the draft's cache is re-read next time."""
        t0 = time.perf_counter()
        with torch.inference_mode(False), torch.enable_grad():  # the loops run under inference mode
            self.model.train()
            before = None
            for _ in range(self.steps):
                self.optimizer.zero_grad(set_to_none=True)
                loss = distill_loss(self.model, self.buffer)
                before = float(loss.detach()) if before is None else before
                loss.backward()
                self.optimizer.step()
            self.model.eval()
        self.losses.append(before)
        self.buffer.clear()
        self.inner.reset()  # its K/V came from the old weights; the next propose() prefills the context again
        self.new_request = True  # the text so far is a new buffer entry from here on
        self.updates += 1
        self.update_seconds += time.perf_counter() - t0
