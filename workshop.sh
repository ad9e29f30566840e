#!/usr/bin/env bash
# The workshop: the whole recipe on the sample data, each stage taking the previous stage's HF directory.
#
#   bash workshop.sh                      # about 8 minutes on a 2-core CPU; writes out/workshop/
#   DOMAIN=finance bash workshop.sh       # the same on the finance sample corpus
#   TARGET=models/smollm2-135m-instruct bash workshop.sh
#                                         # the real-model track (about 40 minutes): from a public checkpoint
#                                         # (python prepare_real_model.py), writes out/real/ and the paper table
#   TARGET=models/gemma3-270m bash workshop.sh
#                                         # the same from a base model, as ixi-GEN adapts one: writes out/gemma/
#
# Each `run` line below is one stage's ordinary command, printed before it runs (the README walks through them).
# A stage whose output directory holds a finished run (complete.json) is skipped, and an interrupted one is resumed
# from its last checkpoint, so the script can be stopped and started again. The variables are the knobs
# (tests/test_pipeline.py turns them all down for a one-minute smoke run).
set -euo pipefail
cd "$(dirname "$0")"

TARGET=${TARGET:-small}            # the target: a preset (5.8M parameters, pretrained here first) or an HF directory
if [ -f "$TARGET/config.json" ]; then
    REAL=1                         # a real checkpoint: it is the base; bf16 compute (faster on this CPU)
    if grep -q '"model_type": *"gemma3_text"' "$TARGET/config.json"; then
        # Gemma-3-270M: a pretrained base, without a chat template (SFT gets the sample one), whose 262,144-token
        # head makes each token about twice as dear as SmolLM2's: to stay within 45 minutes, a quarter of its DACP
        # steps, half of each SFT stage's conversations, 40 distillation steps and each eval set's first 128 rows
        # (docs/results.md)
        OUT=${OUT:-out/gemma}
        CHAT_TEMPLATE=${CHAT_TEMPLATE:-data/chat_templates/gemma.jinja}
        DACP_STEPS=${DACP_STEPS:-10}
        SFT_EPOCHS=${SFT_EPOCHS:-0.5}
        DISTILL_STEPS=${DISTILL_STEPS:-40}
        DRAFT_LAYERS=${DRAFT_LAYERS:-4}  # (of 18; 2 is measured better on SmolLM2 only)
        GEN_TEMPERATURE=${GEN_TEMPERATURE:-0}
        EVAL_LIMIT=${EVAL_LIMIT:-128}
    fi
    OUT=${OUT:-out/real}
    DRAFT=${DRAFT:-$OUT/${DOMAIN:-telco}-sft}   # the draft: a truncated copy of the SFT target ...
    DRAFT_LAYERS=${DRAFT_LAYERS:-2}             # ... keeping its first 2 of 30 layers (measured against 4 and 8:
                                                # docs/benchmarks.md, how deep a draft)
    DACP_STEPS=${DACP_STEPS:-40}   # x 8 sequences x 256 tokens
    DACP_LR=${DACP_LR:-1e-4}
    SFT_LR=${SFT_LR:-5e-5}
    DISTILL_STEPS=${DISTILL_STEPS:-100}
    DISTILL_LR=${DISTILL_LR:-2e-3}
    DRAFT_VOCAB=${DRAFT_VOCAB:-4096}  # the draft's head: the 4,096 most frequent telco tokens (FR-Spec; half its cost)
    GEN_TEMPERATURE=${GEN_TEMPERATURE:-0,1}  # teacher data: greedy and temperature-1 continuations of each prompt
    GAMMA=${GAMMA:-2}              # draft tokens per round: 2 measured fastest on this CPU (docs/benchmarks.md)
    DTYPE=${DTYPE:-bfloat16}
    EVAL_DTYPE=${EVAL_DTYPE:-float32}  # scores: float32 answers do not move with the batch or the CPU (bf16 ones do)
else
    REAL=
    OUT=${OUT:-out/workshop}
    DRAFT=${DRAFT:-tiny}           # the draft's preset (0.9M parameters, 2 layers), on the target's tokenizer
    DRAFT_LAYERS=${DRAFT_LAYERS:-}
    DACP_STEPS=${DACP_STEPS:-150}  # continual pretraining on the domain with 50 % replay
    DACP_LR=${DACP_LR:-3e-4}
    SFT_LR=${SFT_LR:-2e-4}
    DISTILL_STEPS=${DISTILL_STEPS:-60}
    DISTILL_LR=${DISTILL_LR:-1e-3}
    DRAFT_VOCAB=${DRAFT_VOCAB:-}   # (the tiny draft's head is small already)
    GEN_TEMPERATURE=${GEN_TEMPERATURE:-0}
    GAMMA=${GAMMA:-4}
    DTYPE=${DTYPE:-float32}
    EVAL_DTYPE=${EVAL_DTYPE:-float32}
fi
CHAT_TEMPLATE=${CHAT_TEMPLATE:-}   # SFT's chat template, for a base checkpoint that has none
DOMAIN=${DOMAIN:-telco}
NPROC=${NPROC:-2}                  # processes for the pretraining stages (FSDP2 over gloo on a CPU)
BASE_STEPS=${BASE_STEPS:-150}      # pretraining the base from scratch on the general corpus (more overfits it)
SFT_EPOCHS=${SFT_EPOCHS:-2}        # per curriculum stage (0.5: half its conversations)
SFT_BATCH=${SFT_BATCH:-16}         # conversations per SFT step
GEN_TOKENS=${GEN_TOKENS:-64}       # teacher continuation length for distillation
EVAL_LIMIT=${EVAL_LIMIT:-}         # score only the first N rows of each eval set (empty: all)
BENCH_PROMPTS=${BENCH_PROMPTS:-8}
BENCH_TOKENS=${BENCH_TOKENS:-128}  # new tokens per prompt in the speculative benchmark
DATA=${DATA:-data}                 # the corpora, conversations and eval sets
RATIOS=${RATIOS:-0,0.1,0.25,0.5,0.75,1}  # ABLATION=replay: the replay ratios; 1 (general text only) is the
                                   # control: what the same training does without the domain (forgetting vs repair)

# Every knob is checked before the first stage: a typo is refused now, not after 15 minutes of DACP and SFT.
fail() { echo "workshop.sh: $*" >&2; exit 2; }
for knob in NPROC BASE_STEPS DACP_STEPS DISTILL_STEPS SFT_BATCH GEN_TOKENS BENCH_PROMPTS BENCH_TOKENS \
            GAMMA ${DRAFT_LAYERS:+DRAFT_LAYERS} ${DRAFT_VOCAB:+DRAFT_VOCAB} ${EVAL_LIMIT:+EVAL_LIMIT}; do
    [[ ${!knob} =~ ^[1-9][0-9]*$ ]] || fail "$knob=${!knob}: expected a whole number >= 1"
done
[[ $SFT_EPOCHS =~ ^([0-9]+\.?[0-9]*|\.[0-9]+)$ && ! $SFT_EPOCHS =~ ^[0.]+$ ]] ||
    fail "SFT_EPOCHS=$SFT_EPOCHS: expected a number > 0"
if [[ ! -f $TARGET/config.json ]] && ! python -c "import model, sys; sys.exit(sys.argv[1] not in model.PRESETS)" \
        "$TARGET" 2> /dev/null; then
    fail "TARGET=$TARGET: neither an HF directory (no config.json there) nor a preset"
fi
for knob in DTYPE EVAL_DTYPE; do
    [[ ${!knob} == float32 || ${!knob} == bfloat16 ]] || fail "$knob=${!knob}: expected float32 or bfloat16"
done
[[ -d $DATA/$DOMAIN/train ]] || fail "DOMAIN=$DOMAIN: no $DATA/$DOMAIN/train/"
[[ -z $CHAT_TEMPLATE || -f $CHAT_TEMPLATE ]] || fail "CHAT_TEMPLATE=$CHAT_TEMPLATE: no such file"
if [[ -n $REAL && -z $CHAT_TEMPLATE && ! -f $TARGET/chat_template.jinja ]] &&
        ! grep -q '"chat_template"' "$TARGET/tokenizer_config.json" 2> /dev/null; then
    fail "TARGET=$TARGET has no chat template (a base model): set CHAT_TEMPLATE=FILE (samples in data/chat_templates/)"
fi
[[ -z ${ABLATION:-} || $ABLATION == replay || $ABLATION == sft ]] || fail "ABLATION=$ABLATION: expected replay or sft"
ratio='(0(\.[0-9]*)?|1(\.0*)?|\.[0-9]+)'  # a number in [0, 1]
[[ $RATIOS =~ ^$ratio(,$ratio)*$ ]] || fail "RATIOS=$RATIOS: expected replay ratios in [0, 1], comma-separated"
# A stage runs with the parent-death signal set: if this script is killed (even with SIGKILL), its torchrun and
# Python children are stopped with it instead of running on, holding the output's lock.
pdeath=$(setpriv --pdeathsig TERM true 2> /dev/null && echo "setpriv --pdeathsig TERM" || true)

took=()
times="$OUT/stage-times${ABLATION:+-$ABLATION}.txt"  # each stage's seconds and command, as it finishes
mkdir -p "$OUT"
run() {
    echo
    echo "+ $*"
    local start=$SECONDS
    $pdeath "$@"
    took+=("$(( SECONDS - start )) s  $*")
    printf '%s\n' "${took[@]}" > "$times"
}

# stage <output dir> <command...>: skip a finished stage, resume an interrupted one.
stage() {
    local dir=$1
    shift
    if [ -f "$dir/complete.json" ]; then  # written last by a finished run (a model alone may lack its tail)
        echo
        echo "= $dir is already there: skipping \"$*\""
    elif [ -f "$dir/run.json" ] || compgen -G "$dir/checkpoints/step_*" > /dev/null; then
        run "$@" --resume
    else
        run "$@"
    fi
}

torchrun="torchrun --nproc_per_node=$NPROC"

# 1. A tokenizer (BPE, trained on the sample corpora) and a base model pretrained from scratch on general text;
#    a real checkpoint is its own base.
if [ -n "$REAL" ]; then
    BASE=$TARGET
else
    BASE=$OUT/base
    stage "$BASE" $torchrun train.py --domain general --replay-ratio 0 --init-from "$TARGET" --out "$BASE" \
        --data-root "$DATA" --max-steps "$BASE_STEPS" --lr 1e-3 --min-lr 1e-4 --warmup-steps 20 --eval-every 0
fi
# 2. DACP: continual pretraining on the domain corpus with 50 % general replay, the LR re-warmed (ixi-GEN).
dacp=(--domain "$DOMAIN" --data-root "$DATA" --init-from "$BASE" --max-steps "$DACP_STEPS" --lr "$DACP_LR")
dacp+=(--eval-every 0 --dtype "$DTYPE")
dacp+=(${REAL:+--batch-size 8 --micro-batch-size 4 --warmup-steps 5})  # a real checkpoint: 8 x 256 tokens a step
stage "$OUT/$DOMAIN" $torchrun train.py "${dacp[@]}" --replay-ratio 0.5 --out "$OUT/$DOMAIN"

# 3. Curriculum SFT: general conversations, then domain, then expert (SOAEsV2).
sft=(--domain "$DOMAIN" --data-root "$DATA" --epochs "$SFT_EPOCHS" --lr "$SFT_LR" --dtype "$DTYPE")
sft+=(--batch-size "$SFT_BATCH" --micro-batch-size "$(( SFT_BATCH < 8 ? SFT_BATCH : 8 ))")
sft+=(${CHAT_TEMPLATE:+--chat-template "$CHAT_TEMPLATE"})
stage "$OUT/$DOMAIN-sft" python sft.py "${sft[@]}" --init-from "$OUT/$DOMAIN" --out "$OUT/$DOMAIN-sft" \
    --export-stages  # (each stage's model too: ABLATION=sft scores what each stage did)

# The ablations, each its own command from the track's outputs: ABLATION=replay or ABLATION=sft.
if [ -n "${ABLATION:-}" ]; then
    case $ABLATION in
    replay)  # ixi-GEN Fig. 3: the same DACP at each replay ratio (0.5 is the track's run), scored on held-out text;
             # ratio 1, general text only, is the control: retention relative to it is forgetting, while relative
             # to the base it also counts what any training repairs in a real (de-quantised) checkpoint
        mkdir -p "$OUT/replay-sweep"
        [ -e "$OUT/replay-sweep/replay-0.5" ] || ln -s "../$DOMAIN" "$OUT/replay-sweep/replay-0.5"
        run $torchrun replay_sweep.py "${dacp[@]}" --ratios "$RATIOS" --out "$OUT/replay-sweep"
        # (%g names each run as replay_sweep.py does: RATIOS=0.0,0.50 -> replay-0, replay-0.5)
        run python eval.py "$BASE" $(printf " $OUT/replay-sweep/replay-%g" ${RATIOS//,/ }) --domain "$DOMAIN" \
            --data-root "$DATA" --general general,heldout --tasks bpb,mcq --dtype "$EVAL_DTYPE" \
            --out "$OUT/eval-replay-$DOMAIN" ${EVAL_LIMIT:+--limit "$EVAL_LIMIT"} ;;
    sft)  # SOAEsV2's baselines: the same SFT without DACP, and single-stage SFT after DACP
        stage "$OUT/$DOMAIN-sft-alone" python sft.py "${sft[@]}" --init-from "$BASE" --out "$OUT/$DOMAIN-sft-alone"
        stage "$OUT/$DOMAIN-sft-single" python sft.py "${sft[@]}" --single-stage --init-from "$OUT/$DOMAIN" \
            --out "$OUT/$DOMAIN-sft-single"
        # the curriculum's reading tested: each stage's model, and the curriculum with its last two stages swapped,
        # ending on the domain conversations, whose answers are nearer the references' length than the expert
        # ones (telco: 74 and 92 words on average; the references 35)
        stages=("$DATA/$DOMAIN"/sft/*.jsonl)
        n=${#stages[@]}
        (( n >= 2 )) || fail "ABLATION=sft: $DATA/$DOMAIN/sft/ has $n stage(s): nothing to swap"
        swapped=("${stages[@]:0:n-2}" "${stages[n-1]}" "${stages[n-2]}")
        stage "$OUT/$DOMAIN-sft-swapped" python sft.py "${sft[@]}" --init-from "$OUT/$DOMAIN" \
            --out "$OUT/$DOMAIN-sft-swapped" --stages "$(IFS=,; echo "${swapped[*]}")"
        run python eval.py "$OUT/$DOMAIN-sft-alone" "$OUT/$DOMAIN-sft-single" "$OUT/$DOMAIN-sft"/stage-* \
            "$OUT/$DOMAIN-sft-swapped" --domain "$DOMAIN" --tasks bpb,qa --data-root "$DATA" --dtype "$EVAL_DTYPE" \
            --out "$OUT/eval-sft-$DOMAIN" ${EVAL_LIMIT:+--limit "$EVAL_LIMIT"} ;;
    esac
    if [ -n "$REAL" ]; then  # (the paper table is the real-model track's; the toy workshop has no held-out set)
        run python report.py "$OUT" --domain "$DOMAIN" --data-root "$DATA"
    fi
    printf '  %s\n' "${took[@]}"
    exit 0
fi

# 4. A draft: a smaller model distilled from the SFT target on the target's own outputs (DistillSpec), generated
#    greedily because stages 5 and 6 decode greedily: the draft learns the continuations it will be asked to guess
#    (on a real checkpoint also sampled at temperature 1, and with a head over the frequent tokens only).
stage "$OUT/$DOMAIN-draft" python distill.py --teacher "$OUT/$DOMAIN-sft" --student "$DRAFT" \
    ${DRAFT_LAYERS:+--student-layers "$DRAFT_LAYERS"} ${DRAFT_VOCAB:+--draft-vocab "$DRAFT_VOCAB"} \
    --domain "$DOMAIN" --data-root "$DATA" --out "$OUT/$DOMAIN-draft" --max-steps "$DISTILL_STEPS" \
    --lr "$DISTILL_LR" --gen-tokens "$GEN_TOKENS" --gen-temperature "$GEN_TEMPERATURE" --gamma "$GAMMA" \
    --dtype "$DTYPE"

# 5. Speculative decoding with that draft against plain decoding of the target, on the same prompts.
run python speculative.py --target "$OUT/$DOMAIN-sft" --draft "$OUT/$DOMAIN-draft" --bench --gamma "$GAMMA" \
    --prompts "$DATA/$DOMAIN/eval/qa.jsonl" --n-prompts "$BENCH_PROMPTS" --max-new-tokens "$BENCH_TOKENS" \
    --json "$OUT/speculative-$DOMAIN.json"

# 6. Every stage side by side: domain and general bpb, multiple choice, QA (ROUGE-1, BLEU-4), retention (on a real
#    checkpoint also on data/heldout, general text and questions kept apart from the replay corpus).
run python eval.py "$BASE" "$OUT/$DOMAIN" "$OUT/$DOMAIN-sft" --domain "$DOMAIN" --out "$OUT/eval-$DOMAIN" \
    --data-root "$DATA" ${REAL:+--general general,heldout} --dtype "$EVAL_DTYPE" ${EVAL_LIMIT:+--limit "$EVAL_LIMIT"}

# 7. The papers' headline results beside ours (and the ablations', once ABLATION=... has run them).
if [ -n "$REAL" ]; then
    run python report.py "$OUT" --domain "$DOMAIN" --data-root "$DATA"
fi

echo
echo "time per stage:"
printf '  %s\n' "${took[@]}"
echo "done: the models are in $OUT/, the tables in $OUT/eval-$DOMAIN.md and $OUT/speculative-$DOMAIN.json"
