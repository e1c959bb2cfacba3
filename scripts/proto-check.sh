#!/usr/bin/env bash
# Checks the gRPC contract in proto/ with buf (installed by scripts/tools.sh):
#   buf lint                   STANDARD rules (buf.yaml)
#   buf format -d --exit-code  formatting
#   buf breaking               FILE rules, against the proto of a base commit
#
# The base commit, unless BUF_BREAKING_AGAINST names one (any git revision):
# - proto/ or buf.yaml has uncommitted changes: HEAD (what you are changing);
# - else HEAD is not main and main is known: the merge-base with main;
# - else (CI: a clean clone of main, HEAD == main): HEAD~1, the main that
#   came before the commit under test.
# The base's proto/ is exported with `git archive` (works in shallow clones as
# long as the commit is present). Skipped, with a message, when there is no
# such commit or it has no proto/ yet.
set -euo pipefail
cd "$(dirname "$0")/.."

buf=.tools/venv/bin/buf
if [[ ! -x "$buf" ]]; then
    echo "proto-check: $buf is missing: run scripts/tools.sh first" >&2
    exit 2
fi

echo "proto-check: buf lint"
"$buf" lint
echo "proto-check: buf format -d --exit-code"
"$buf" format -d --exit-code

base_rev() {
    if [[ -n "${BUF_BREAKING_AGAINST:-}" ]]; then
        echo "$BUF_BREAKING_AGAINST"
    elif [[ -n "$(git status --porcelain -- proto buf.yaml)" ]]; then
        echo HEAD
    else
        local main=""
        for candidate in main origin/main; do
            if git rev-parse -q --verify "$candidate^{commit}" >/dev/null; then
                main=$candidate
                break
            fi
        done
        if [[ -n "$main" && "$(git rev-parse HEAD)" != "$(git rev-parse "$main")" ]]; then
            git merge-base HEAD "$main" || echo HEAD~1
        else
            echo HEAD~1
        fi
    fi
}

if ! git rev-parse -q --verify HEAD >/dev/null 2>&1; then
    echo "proto-check: buf breaking skipped: not a git checkout with commits"
    exit 0
fi
rev=$(base_rev)
if ! base=$(git rev-parse -q --verify "$rev^{commit}" 2>/dev/null); then
    echo "proto-check: buf breaking skipped: no commit $rev (first commit, or a shallow clone)"
    exit 0
fi
if [[ -z "$(git ls-tree -d "$base" proto/gormic)" ]]; then
    echo "proto-check: buf breaking skipped: $rev ($base) has no proto/gormic yet"
    exit 0
fi

against=$(mktemp -d)
trap 'rm -rf "$against"' EXIT
git archive "$base" proto | tar -x -C "$against"
echo "proto-check: buf breaking against $rev ($(git rev-parse --short "$base"))"
"$buf" breaking --against "$against/proto"
echo "proto-check: ok"
