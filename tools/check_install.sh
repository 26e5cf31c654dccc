#!/usr/bin/env bash
# make check-install: install vit_jax as users do, into fresh virtualenvs, then a smoke run in each
# (tools/smoke_install.py: a tiny checkpoint, predict, export to every format and verify).
#   a) pip install .             (no extra: hf and onnx must be refused in one line)
#   b) pip install ".[export]"   (the index's default torch: the CUDA build, with triton)
#   c) tensorflow and the oldest jax/flax/optax/orbax-checkpoint/tensorflow we declare installed
#      first, then pip install .: those versions must stay as they were, and everything works.
# Usage: tools/check_install.sh [a] [b] [c]  (default: all). KEEP=1 keeps the venvs in $WORK.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
WORK=${WORK:-$(mktemp -d "${TMPDIR:-/tmp}/vit_jax_check_install.XXXXXX")}
CASES=("$@")
[ ${#CASES[@]} -eq 0 ] && CASES=(a b c)
cleanup() { [ "${KEEP:-0}" = 1 ] || rm -rf "$WORK"; }
trap cleanup EXIT

# The oldest versions we declare: pyproject's lower bounds (`>=X` -> `==X`).
OLDEST=$("$PYTHON" - "$ROOT/pyproject.toml" <<'PY'
import re, sys, tomllib
deps = tomllib.load(open(sys.argv[1], 'rb'))['project']['dependencies']
pins = {}
for dep in deps:
  m = re.fullmatch(r'([A-Za-z0-9_.-]+)>=([0-9.]+)', dep.replace(' ', ''))
  if m and m.group(1) in ('jax', 'flax', 'optax', 'orbax-checkpoint', 'tensorflow'):
    pins[m.group(1)] = m.group(2)
print(' '.join(f'{k}=={v}' for k, v in pins.items()) + f' jaxlib=={pins["jax"]}')
PY
)

status=0
for case in "${CASES[@]}"; do
  venv="$WORK/venv-$case"
  start=$SECONDS
  echo "== check-install $case: fresh venv $venv"
  "$PYTHON" -m venv "$venv"
  pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)
  smoke_args=()
  case $case in
    a) "${pip[@]}" "$ROOT"; smoke_args=(--no-export-extra) ;;
    b) "${pip[@]}" "$ROOT[export]" ;;
    c)
      echo "   seeding: $OLDEST"
      # shellcheck disable=SC2086  # One argument per requirement.
      "${pip[@]}" $OLDEST
      "$venv/bin/python" -m pip freeze > "$WORK/before-$case.txt"
      "${pip[@]}" "$ROOT"
      "$venv/bin/python" -m pip freeze > "$WORK/after-$case.txt"
      for req in $OLDEST; do
        if ! grep -qiE "^${req//./\\.}(\\.0)*$" "$WORK/after-$case.txt"; then
          echo "   FAIL: $req was replaced: $(grep -i "^${req%%==*}==" "$WORK/after-$case.txt")"
          status=1
        fi
      done
      smoke_args=(--no-export-extra) ;;
    *) echo "unknown case $case (a, b or c)"; exit 2 ;;
  esac
  install_s=$((SECONDS - start))
  "$venv/bin/python" -m pip freeze | grep -iE '^(jax|jaxlib|flax|optax|orbax-checkpoint|tensorflow|tensorflow-cpu|torch|triton)==' \
    | tr '\n' ' ' | sed 's/^/   installed: /'; echo
  if "$venv/bin/python" -m pip freeze | grep -qi '^tensorflow-cpu=='; then
    echo "   FAIL: tensorflow-cpu installed (a second distribution of the tensorflow module)"
    status=1
  fi
  echo "   venv size: $(du -sh "$venv" | cut -f1), install ${install_s}s"
  (cd "$WORK" && "$venv/bin/python" "$ROOT/tools/smoke_install.py" "${smoke_args[@]}") || status=1
  echo "== check-install $case: $((SECONDS - start))s in all"
  [ "${KEEP:-0}" = 1 ] || rm -rf "$venv"
done
[ $status = 0 ] && echo "check-install: ok (${SECONDS}s)" || echo "check-install: FAILED (${SECONDS}s)"
exit $status
