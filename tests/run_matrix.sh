#!/usr/bin/env bash
# The test command (README, .ci/run): the whole suite twice, each in a virtual environment made afresh.
#   locked: tests/requirements-lock.txt, the exact versions at setup.py's lower bounds (reproducible);
#   newest: the newest versions setup.py admits today (what `pip install` gives a user now).
# Both must pass. The remote-code version check is also run against a real transformers older than the minimum.
# MACCAP_RESOLUTIONS="newest" (or "locked") runs one of them; pytest arguments after the script's name are passed on.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OLD_TRANSFORMERS=5.22.2  # the newest release below transformers_compat.MIN_TRANSFORMERS

make_venv() {  # make_venv NAME: a new virtual environment .venv-NAME with maccap and its test requirements
  local venv=".venv-$1"
  rm -rf "$venv" && "$PYTHON" -m venv "$venv" && "$venv/bin/pip" install -qq --upgrade pip || return 1
  if [ "$1" = locked ]; then
    "$venv/bin/pip" install -qq -r tests/requirements-lock.txt && "$venv/bin/pip" install -qq --no-deps -e .
  else
    "$venv/bin/pip" install -qq -e ".[tests]"
  fi
}

# The browser test (tests/test_serve.py) drives Debian's headless Chromium through its chromium-driver; nothing
# downloads a browser build. Installed with apt where missing (as root); without them that test fails under CI=true
# and is skipped elsewhere.
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
    echo "=== installing chromium and chromium-driver with apt, for the browser test"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; } \
      >/dev/null || echo "could not install chromium and chromium-driver with apt" >&2
  else
    echo "no chromium / chromedriver, and no apt-get as root to install them: see tests/test_serve.py" >&2
  fi
fi

old=.venv-old-transformers  # transformers alone, imported over the locked environment by one test
rm -rf "$old"
if "$PYTHON" -m pip install -qq --no-deps --target "$old" "transformers==$OLD_TRANSFORMERS"; then
  export MACCAP_OLD_TRANSFORMERS="$PWD/$old"
else
  echo "could not install transformers $OLD_TRANSFORMERS: the real-older-transformers test is skipped" >&2
fi

status=0
summary=()
for name in ${MACCAP_RESOLUTIONS:-locked newest}; do
  echo "=== resolution: $name"
  if ! make_venv "$name"; then
    echo "=== $name: installing failed"
    summary+=("$name: install failed") && status=1 && continue
  fi
  ".venv-$name/bin/python" -c 'import importlib.metadata as m
print("    " + " ".join(f"{p}=={m.version(p)}" for p in ("torch", "transformers", "huggingface_hub", "tokenizers",
      "safetensors", "accelerate", "datasets", "numpy", "pillow", "open_clip_torch", "gradio", "selenium",
      "onnx", "onnxruntime")))'
  ".venv-$name/bin/python" -m pytest tests -q -p no:cacheprovider "$@" 2>&1 | tee ".venv-$name/pytest.log"
  rc=${PIPESTATUS[0]}
  counts=$(tail -n 1 ".venv-$name/pytest.log" | grep -oE "[0-9]+ (passed|failed|errors?|skipped)" | paste -sd, -)
  summary+=("$name: ${counts:-no result} (pytest exit $rc)")
  [ "$rc" -eq 0 ] || status=1
done

echo "=== summary"
printf '    %s\n' "${summary[@]}"
exit $status
