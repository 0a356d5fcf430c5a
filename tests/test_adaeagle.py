"""AdaEAGLE (draft_length.AdaEagle): the length predictor plans each EAGLE-2 tree's depth before it is drafted. The
output stays the target's greedy text, the tree grows no deeper than planned, planning changes no other policy,
the predictor saves and loads, and the shipped one predicts held-out acceptance better than any constant."""

import copy
import json

import pytest
import table
import torch

from cost import CostCurve
from draft_length import AdaEagle, CostAware, LengthPredictor, penalized_l1
from heads import EagleDrafter
from methods import DRAFT_LENGTHS
from prompts import function_prompts
from specdec import decode, tree_speculative_generate
from tests.conftest import WEIGHTS
from train import adaeagle_traces
from tree import depths

pytestmark = pytest.mark.usefixtures("one_thread")


def constant_predictor(hidden_size: int, value: float) -> LengthPredictor:
    """A predictor that says `value` whatever it reads."""
    predictor = LengthPredictor(hidden_size, 4)
    with torch.no_grad():
        predictor.out.weight.zero_()
        predictor.out.bias.fill_(value)
    return predictor.eval()


def test_greedy_output_with_adaeagle_equals_autoregressive_on_shipped_weights(short_references):
    enc, target, references = short_references
    drafter, policy = table.drafter("eagle", target), table.draft_length("adaeagle", target)
    planned = []
    for prompt, expected in references:
        out, stats = decode(
            target,
            drafter,
            True,
            prompt,
            24,
            4,
            draft_length=policy,
            temperature=0,
            eot=enc.eot_token,
            on_tree=lambda tree, path: planned.append(policy.depth),
        )
        assert out == expected  # whole lists: lengths included
    assert min(planned) < policy.most  # the predictor cut some trees short on these prompts


@pytest.mark.parametrize("said, depth", [(1.0, 1), (2.3, 2), (3.6, 4), (-5.0, 1), (100.0, 6)])
def test_a_tree_grows_exactly_the_planned_depth_and_never_deeper(short_references, said, depth):
    enc, target, references = short_references
    policy = AdaEagle(constant_predictor(target.config.hidden_size, said), target.embed_tokens, most=6)
    drafter = EagleDrafter.from_pretrained(target, WEIGHTS / "eagle", depth=8, width=2, beam=2, size=40)
    trees = []
    tree_speculative_generate(
        target, drafter, references[0][0], 16, draft_length=policy, on_tree=lambda tree, path: trees.append(tree)
    )
    grown = [max(depths(tree)) for tree in trees]
    assert max(grown) == depth  # Round(LDLP), clamped to [1, most]
    assert all(g <= depth for g in grown)  # the budget may cut the last trees shorter, never deeper


def snapshot(value):
    """A policy's whole state, comparable with ==: tensors and modules as lists, generators by their state, other
    objects by their attributes, all the way down."""
    if isinstance(value, torch.Generator):
        return value.get_state().tolist()
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, torch.nn.Module):
        return {k: t.tolist() for k, t in value.state_dict().items()}
    if isinstance(value, list | tuple):
        return [snapshot(v) for v in value]
    if isinstance(value, dict):
        return {k: snapshot(v) for k, v in value.items()}
    if hasattr(value, "__dict__"):
        return type(value).__name__, snapshot(vars(value))
    return copy.deepcopy(value)


def other_policies(target) -> dict:
    """Every policy of the table but AdaEAGLE; -l cost on a made-up cost curve instead of one measured here."""
    policies = {n: table.draft_length(n, target) for n in DRAFT_LENGTHS if n not in ("adaeagle", "cost")}
    curve = CostCurve(sizes=[1, 8, 32], chain_ms=[10.0, 12.0, 20.0], tree_ms=[10.0, 13.0, 22.0])
    return policies | {"cost": CostAware(curve, 0.1)}


def test_planning_changes_no_other_policy_and_sizes_the_adaeagle_tree(short_references):
    enc, target, references = short_references
    context = references[0][0]
    with torch.inference_mode():
        features = target(torch.tensor([context[:-1]]), return_hidden=True)[1][0]
    for name, policy in other_policies(target).items():
        policy.reset()
        before = snapshot(policy)
        policy.plan(context, features)
        assert snapshot(policy) == before, name
    adaeagle = AdaEagle(constant_predictor(target.config.hidden_size, 2.0), target.embed_tokens, most=6)
    before = snapshot(adaeagle)
    adaeagle.plan(context, features)
    assert snapshot(adaeagle) != before and adaeagle.depth == 2  # the same check sees a plan that acts


def test_the_predictor_saves_and_loads_to_the_same_function(tmp_path):
    gen = torch.Generator().manual_seed(0)
    predictor = LengthPredictor(8, 4)
    with torch.no_grad():
        for p in list(predictor.parameters()) + list(predictor.buffers()):
            p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
    predictor.save(tmp_path, most=5, penalty=2.0)
    loaded, most = LengthPredictor.load(tmp_path)
    x = torch.randn(16, 16, generator=gen)
    assert most == 5 and torch.equal(loaded(x), predictor(x))


def test_the_penalty_weighs_a_short_prediction_lambda_times_a_long_one():
    accepted = torch.tensor([3.0, 3.0])
    assert penalized_l1(torch.tensor([1.0, 1.0]), accepted, 4.0) == 8.0  # two short of 3, times 4
    assert penalized_l1(torch.tensor([5.0, 5.0]), accepted, 4.0) == 2.0  # two past 3
    assert penalized_l1(accepted, accepted, 4.0) == 0.0


def test_the_shipped_predictor_beats_every_constant_on_held_out_prompts(short_references):
    """Logged as train.py adaeagle logs its training data, on held-out prompts it never saw; the constant is the
    best one in hindsight, the penalty / (1 + penalty) quantile of these very labels."""
    enc, target, _ = short_references
    predictor, most = LengthPredictor.load(WEIGHTS / "adaeagle")
    lam = json.loads((WEIGHTS / "adaeagle" / "config.json").read_text())["penalty"]
    drafter = EagleDrafter.from_pretrained(target, WEIGHTS / "eagle", depth=most, width=2, beam=2, size=12)
    x, y, _ = adaeagle_traces(target, drafter, function_prompts(enc, 6, context_tokens=96), 40)
    with torch.no_grad():
        learned = penalized_l1(predictor(x), y, lam)
    best_constant = penalized_l1(torch.quantile(y, lam / (1 + lam)).expand(len(y)), y, lam)
    assert learned < best_constant
