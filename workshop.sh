#!/usr/bin/env bash
# The workshop: the whole recipe on the sample data, each stage taking the previous stage's HF directory.
#
#   bash workshop.sh                      # about 20 minutes on a 2-core CPU; writes out/workshop/
#   DOMAIN=finance bash workshop.sh       # the same on the finance sample corpus
#
# Each `run` line below is one stage's ordinary command, printed before it runs (the README walks through them).
# A stage whose output directory already holds a finished model is skipped, and an interrupted one is resumed
# from its last checkpoint, so the script can be stopped and started again. The variables are the knobs
# (tests/test_pipeline.py turns them all down for a one-minute smoke run).
set -euo pipefail
cd "$(dirname "$0")"

OUT=${OUT:-out/workshop}
DOMAIN=${DOMAIN:-telco}
NPROC=${NPROC:-2}                  # processes for the pretraining stages (FSDP2 over gloo on a CPU)
TARGET=${TARGET:-small}            # the target's preset (5.8M parameters)
DRAFT=${DRAFT:-tiny}               # the draft's preset (0.9M parameters, 2 layers), on the target's tokenizer
BASE_STEPS=${BASE_STEPS:-150}      # pretraining the base from scratch on the general corpus (more overfits it)
DACP_STEPS=${DACP_STEPS:-150}      # continual pretraining on the domain with 50 % replay
SFT_EPOCHS=${SFT_EPOCHS:-2}        # per curriculum stage
DISTILL_STEPS=${DISTILL_STEPS:-60}
GEN_TOKENS=${GEN_TOKENS:-64}       # teacher continuation length for distillation
EVAL_LIMIT=${EVAL_LIMIT:-}         # score only the first N rows of each eval set (empty: all)
BENCH_PROMPTS=${BENCH_PROMPTS:-8}

took=()
run() {
    echo
    echo "+ $*"
    local start=$SECONDS
    "$@"
    took+=("$(( SECONDS - start )) s  $*")
}

# stage <output dir> <command...>: skip a finished stage, resume an interrupted one.
stage() {
    local dir=$1
    shift
    if [ -f "$dir/config.json" ]; then
        echo
        echo "= $dir is already there: skipping \"$*\""
    elif [ -f "$dir/run.json" ] || compgen -G "$dir/checkpoints/step_*" > /dev/null; then
        run "$@" --resume
    else
        run "$@"
    fi
}

torchrun="torchrun --nproc_per_node=$NPROC"

# 1. A tokenizer (BPE, trained on the sample corpora) and a base model pretrained from scratch on general text.
stage "$OUT/base" $torchrun train.py --domain general --replay-ratio 0 --init-from "$TARGET" --out "$OUT/base" \
    --max-steps "$BASE_STEPS" --lr 1e-3 --min-lr 1e-4 --warmup-steps 20 --eval-every 0

# 2. DACP: continual pretraining on the domain corpus with 50 % general replay, the LR re-warmed (ixi-GEN).
stage "$OUT/$DOMAIN" $torchrun train.py --domain "$DOMAIN" --replay-ratio 0.5 --init-from "$OUT/base" \
    --out "$OUT/$DOMAIN" --max-steps "$DACP_STEPS" --eval-every 0

# 3. Curriculum SFT: general conversations, then domain, then expert (SOAEsV2).
stage "$OUT/$DOMAIN-sft" python sft.py --init-from "$OUT/$DOMAIN" --domain "$DOMAIN" --out "$OUT/$DOMAIN-sft" \
    --epochs "$SFT_EPOCHS"

# 4. A draft: a smaller model distilled from the SFT target on the target's own outputs (DistillSpec), generated
#    greedily because stages 5 and 6 decode greedily: the draft learns the continuations it will be asked to guess.
stage "$OUT/$DOMAIN-draft" python distill.py --teacher "$OUT/$DOMAIN-sft" --student "$DRAFT" --domain "$DOMAIN" \
    --out "$OUT/$DOMAIN-draft" --max-steps "$DISTILL_STEPS" --gen-tokens "$GEN_TOKENS" --gen-temperature 0

# 5. Speculative decoding with that draft against plain decoding of the target, on the same prompts.
run python speculative.py --target "$OUT/$DOMAIN-sft" --draft "$OUT/$DOMAIN-draft" --bench \
    --prompts "data/$DOMAIN/eval/qa.jsonl" --n-prompts "$BENCH_PROMPTS" --json "$OUT/speculative-$DOMAIN.json"

# 6. Every stage side by side: domain and general bpb, multiple choice, QA (ROUGE-1, BLEU-4), retention.
run python eval.py "$OUT/base" "$OUT/$DOMAIN" "$OUT/$DOMAIN-sft" --domain "$DOMAIN" --out "$OUT/eval-$DOMAIN" \
    ${EVAL_LIMIT:+--limit "$EVAL_LIMIT"}

echo
echo "time per stage:"
printf '  %s\n' "${took[@]}"
echo "done: the models are in $OUT/, the tables in $OUT/eval-$DOMAIN.md and $OUT/speculative-$DOMAIN.json"
