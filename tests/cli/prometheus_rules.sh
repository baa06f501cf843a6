#!/usr/bin/env bash
# The Prometheus alert rules shipped in dist/prometheus: `promtool check
# rules` accepts them, `promtool test rules` passes their unit tests, and
# every alert has a test where it fires and one where it does not.
#   prometheus_rules.sh SOURCE_DIR
# Exits 77 (skipped) when promtool is not installed (Debian: prometheus).
set -u
src=$1
dir=$src/dist/prometheus
rules=$dir/edgemux-rules.yml
tests=$dir/edgemux-rules.test.yml
if ! command -v promtool >/dev/null; then
  echo "SKIP: promtool not found (Debian package prometheus; scripts/deps.sh installs it)"
  exit 77
fi
fails=0
ok() { printf 'ok   %s\n' "$1"; }
fail() { printf 'FAIL %s\n%s\n' "$1" "${2:-}"; fails=$((fails + 1)); }

if out=$(promtool check rules "$rules" 2>&1); then
  ok "promtool check rules $(basename "$rules")"
else
  fail "promtool check rules" "$out"
fi

# promtool resolves rule_files against the test file's directory.
if out=$(cd "$dir" && promtool test rules "$(basename "$tests")" 2>&1); then
  ok "promtool test rules $(basename "$tests")"
else
  fail "promtool test rules" "$out"
fi

# Coverage: each alert is tested firing (exp_alerts with an entry) and not
# firing (exp_alerts: []). The test file writes each case as
#   alertname: NAME
#   exp_alerts: []          or          exp_alerts:\n  - exp_labels: ...
alerts=$(sed -n 's/^ *- alert: *\([A-Za-z0-9_]*\).*/\1/p' "$rules")
[ -n "$alerts" ] || fail "no alert found in $rules"
cases=$(awk '
  /^ *alertname:/ { name = $2; next }
  /^ *exp_alerts: *\[\] *$/ && name != "" { print name " quiet"; name = ""; next }
  /^ *exp_alerts: *$/ && name != "" { want = name; name = ""; next }
  /^ *- exp_labels:/ && want != "" { print want " fires"; want = ""; next }
' "$tests" | sort -u)
for a in $alerts; do
  for kind in fires quiet; do
    what=firing
    [ "$kind" = quiet ] && what="not firing"
    grep -qx "$a $kind" <<<"$cases" && ok "$a tested $what" ||
      fail "$a is not tested $what ($(basename "$tests"))"
  done
  # Every alert says how bad it is and what it means.
  block=$(awk -v a="$a" '
    /^ *- alert:/ { on = ($3 == a) } on' "$rules")
  for key in 'severity:' 'summary:' 'description:'; do
    grep -q "^ *$key" <<<"$block" && ok "$a has $key" || fail "$a has no $key"
  done
done

[ "$fails" -eq 0 ]
