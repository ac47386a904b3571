#!/usr/bin/env bash
# Lints proto/ with buf (rules in buf.yaml). Installs buf from npm into .tools/buf on first use.
# Exits non-zero when buf reports findings.
set -euo pipefail

BUF_VERSION="1.75.0"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PREFIX="$ROOT/.tools/buf"
BUF="$PREFIX/node_modules/.bin/buf"

if [[ ! -x "$BUF" ]] || [[ "$("$BUF" --version 2>/dev/null)" != "$BUF_VERSION" ]]; then
  echo "installing @bufbuild/buf@$BUF_VERSION into $PREFIX" >&2
  npm install --prefix "$PREFIX" --no-save --no-audit --no-fund "@bufbuild/buf@$BUF_VERSION" >&2
fi

cd "$ROOT"
"$BUF" lint "$@"
echo "buf lint: ok" >&2
