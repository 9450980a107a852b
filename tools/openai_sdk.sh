#!/usr/bin/env bash
# The official openai Python SDK (PyPI, pinned) against a live server on the tiny fixture: see
# tools/openai_sdk_test.py. Used by .ci/run; by hand:  tools/openai_sdk.sh [path/to/blip2-server]
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-target/debug/blip2-server}
PORT=${OPENAI_SDK_PORT:-38458}
VENV=${OPENAI_SDK_VENV:-target/openai-venv}
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import openai' 2>/dev/null; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q "openai==3.51.0"
fi
"$BIN" serve --model tests/fixtures/models/opt-tiny --host 127.0.0.1 --port "$PORT" --shutdown-delay-s 0 \
  >target/openai-sdk-server.log 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do
  python3 -c "import urllib.request,sys; urllib.request.urlopen(sys.argv[1], timeout=2)" \
    "http://127.0.0.1:$PORT/ready" 2>/dev/null && break
  kill -0 $SERVER 2>/dev/null || { cat target/openai-sdk-server.log; exit 1; }
  sleep 0.2
done
"$VENV/bin/python" tools/openai_sdk_test.py "http://127.0.0.1:$PORT"
