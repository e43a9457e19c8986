#!/usr/bin/env bash
# Run four tinker-cookbook recipes, unmodified, for two steps each against a local mint
# server on SmolLM2-135M-Instruct, with the model hub offline; check each exits 0 and logs
# two steps of finite metrics.
#
# The cookbook lives in its own virtual environment (.venv-cookbook, reused when its
# versions match). `mint models pull` converts the base (once) and writes its tokenizer and
# config into the Hugging Face hub cache under HF_HOME, which is how the cookbook's
# `get_tokenizer("HuggingFaceTB/SmolLM2-135M-Instruct")` resolves with HF_HUB_OFFLINE=1.
#
# Environment: MINT_PYTHON (see step 2), MINT_HOME (where the converted base is kept; default ~/.mint),
# COOKBOOK_RUN_DIR (keep the run's data, logs and metrics there; default a temporary folder),
# COOKBOOK_RECIPES (space-separated subset of: math_rl sl_basic shorter guess_number),
# COOKBOOK_WHEELHOUSE (install the cookbook from these wheels, no package index).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

COOKBOOK_VERSION=0.5.8   # newest release whose dependencies the package index has
MODEL=HuggingFaceTB/SmolLM2-135M-Instruct
RENDERER=qwen3_instruct  # ChatML, the format of SmolLM2's own chat template
RECIPES=${COOKBOOK_RECIPES:-"math_rl sl_basic shorter guess_number"}
RECIPE_TIMEOUT_S=${COOKBOOK_RECIPE_TIMEOUT_S:-1200}

# 1. The cookbook's virtual environment (torch pinned to the CPU build mint uses).
VENV=$ROOT/.venv-cookbook
if ! "$VENV/bin/python" -c "import importlib.metadata as m, math_verify, sys; \
sys.exit(m.version('tinker-cookbook') != '$COOKBOOK_VERSION')" 2>/dev/null; then
  echo "creating $VENV with tinker-cookbook $COOKBOOK_VERSION"
  rm -rf "$VENV"
  python3.11 -m venv "$VENV" 2>/dev/null || python3 -m venv "$VENV"
  # COOKBOOK_WHEELHOUSE: a folder of wheels (made once with `pip download -d DIR` and the
  # same requirements) to install from without any package index.
  "$VENV/bin/pip" install --quiet --disable-pip-version-check \
    ${COOKBOOK_WHEELHOUSE:+--no-index --find-links "$COOKBOOK_WHEELHOUSE"} \
    "tinker-cookbook[math-rl]==$COOKBOOK_VERSION" "torch==2.13.0"
fi
COOKBOOK_PY=$VENV/bin/python

# 2. mint from the project's environment; the base converted once into MINT_HOME.
# MINT_PYTHON names an interpreter that already has mint's dependencies (scripts/test.sh
# passes its own); without it the project's .venv is made as the README's set-up does.
if [ -z "${MINT_PYTHON:-}" ]; then
  bash scripts/setup-env.sh >/dev/null
  MINT_PYTHON=$ROOT/.venv/bin/python
fi
MINT="$MINT_PYTHON -m mint.cli"
export PYTHONPATH=$ROOT/src${PYTHONPATH:+:$PYTHONPATH}
BASES_HOME=${MINT_HOME:-$HOME/.mint}
RUN_DIR=${COOKBOOK_RUN_DIR:-$(mktemp -d -t mint-cookbook-XXXXXX)}
mkdir -p "$RUN_DIR/home" "$RUN_DIR/logs" "$RUN_DIR/runs" "$BASES_HOME/bases"
ln -sfn "$BASES_HOME/bases" "$RUN_DIR/home/bases"
export HF_HOME=$RUN_DIR/hf HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export TINKER_TELEMETRY=0 WANDB_MODE=disabled
MINT_HOME=$BASES_HOME $MINT models pull smollm2-135m-instruct >"$RUN_DIR/logs/pull.log" 2>&1 \
  || { cat "$RUN_DIR/logs/pull.log"; exit 1; }

# 3. A mint server on a free port with one tenant, stopped whatever happens next.
PORT=$("$MINT_PYTHON" -c "import socket; s=socket.socket(); s.bind(('127.0.0.1',0)); \
print(s.getsockname()[1])")
export TINKER_BASE_URL=http://127.0.0.1:$PORT TINKER_API_KEY=tml-cookbook-$RANDOM$RANDOM
MINT_HOME=$RUN_DIR/home MINT_API_KEYS=cookbook=$TINKER_API_KEY \
  $MINT serve --port "$PORT" --preload smollm2-135m-instruct >"$RUN_DIR/logs/server.log" 2>&1 &
SERVER_PID=$!
trap 'kill "$SERVER_PID" 2>/dev/null; wait "$SERVER_PID" 2>/dev/null || true' EXIT
for _ in $(seq 120); do
  "$MINT_PYTHON" -c "import urllib.request as u; u.urlopen('$TINKER_BASE_URL/api/v1/healthz')" \
    2>/dev/null && break
  kill -0 "$SERVER_PID" 2>/dev/null || { cat "$RUN_DIR/logs/server.log"; exit 1; }
  sleep 1
done

# 4. The recipes, each with its own command-line options made small.
COMMON="model_name=$MODEL renderer_name=$RENDERER max_steps=2 eval_every=0"
recipe_command() {
  local log_path=$RUN_DIR/runs/$1
  case $1 in
    math_rl) echo "-m tinker_cookbook.recipes.math_rl.train $COMMON env=arithmetic \
      loss_fn=importance_sampling group_size=2 groups_per_batch=2 max_tokens=8 lora_rank=8 \
      save_every=0 base_url=$TINKER_BASE_URL log_path=$log_path behavior_if_log_dir_exists=delete" ;;
    sl_basic) echo "$ROOT/tools/cookbook_sl_basic.py $COMMON batch_size=4 max_length=256 \
      lora_rank=8 save_every=0 base_url=$TINKER_BASE_URL log_path=$log_path" ;;
    shorter) echo "-m tinker_cookbook.recipes.preference.shorter.train $COMMON batch_size=2 \
      group_size=2 max_tokens=16 log_path=$log_path behavior_if_log_dir_exists=delete" ;;
    guess_number) echo "-m tinker_cookbook.recipes.multiplayer_rl.guess_number.train $COMMON \
      batch_size=1 group_size=2 max_tokens=6 save_every=0 log_path=$log_path \
      behavior_if_log_dir_exists=delete" ;;
    *) echo "unknown recipe $1 (choose from math_rl sl_basic shorter guess_number)" >&2
       return 1 ;;
  esac
}

failed=0
: >"$RUN_DIR/summary.txt"
for recipe in $RECIPES; do
  command=$(recipe_command "$recipe")
  started=$(date +%s)
  # shellcheck disable=SC2086  # the command is a list of words
  if (cd "$RUN_DIR" && timeout "$RECIPE_TIMEOUT_S" "$COOKBOOK_PY" $command) \
      >"$RUN_DIR/logs/$recipe.log" 2>&1 </dev/null; then
    status=0
  else
    status=$?
  fi
  seconds=$(( $(date +%s) - started ))
  if ! "$COOKBOOK_PY" "$ROOT/tools/check_cookbook_run.py" "$recipe" \
      "$RUN_DIR/runs/$recipe" "$status" "$seconds" >>"$RUN_DIR/summary.txt"; then
    failed=1
    tail -n 30 "$RUN_DIR/logs/$recipe.log"
  fi
  tail -n 1 "$RUN_DIR/summary.txt"
done
echo "cookbook $COOKBOOK_VERSION against mint: run data in $RUN_DIR"
exit $failed
