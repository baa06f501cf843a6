#!/usr/bin/env bash
# edgemux -t: exit 0 and a line saying the config is valid, or exit 1 and
# every error as file:line: key: what.
set -u
bin=$1
plugins=$2
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
fails=0

check() { # name expected-exit pattern-in-output config-text [extra args...]
  local name=$1 want=$2 pattern=$3 text=$4
  shift 4
  printf '%s\n' "$text" >"$work/$name.yaml"
  out=$(cd "$work" && "$bin" -t -c "$name.yaml" -p "$plugins" "$@" 2>&1)
  got=$?
  if [ "$got" -ne "$want" ] || ! grep -qE -- "$pattern" <<<"$out"; then
    printf 'FAIL %s: exit %s (want %s), output:\n%s\n' "$name" "$got" "$want" "$out"
    fails=$((fails + 1))
  else
    printf 'ok   %s\n' "$name"
  fi
}

printf 'k3y-for-tests\n' >"$work/appkey"
chmod 600 "$work/appkey"
base="server:
  name: edgemux-test
platform:
  app_key_file: appkey
transport:
  plugin: good
discovery:
  plugin: good"

check valid 0 'configuration valid.yaml is valid \(transport fake' "$base
  endpoint: zk1:2181
  interval: 2s
  tags: [a, b]"
check alias 0 'is valid' "$base
cx-server.fake.endpoint: zk1:2181"
check alias_conflict 1 'server\.name: set twice' "$base
cx-server.thing.name: other-name" 
check unknown_plugin_key 1 '^unknown_plugin_key.yaml:9: discovery\.endpiont: unknown key.*did you mean' "$base
  endpiont: zk1:2181"
check bad_plugin_value 1 '^bad_plugin_value.yaml:9: discovery\.interval: ' "$base
  interval: soon"
check alias_twice 1 'endpoint' "$base
  endpoint: a:1
cx-server.fake.endpoint: b:2"
check bad_major 1 'emx-discovery-major\.so: ABI major mismatch: core 1, plugin 2' "server:
  name: e
platform:
  app_key_file: appkey
transport:
  plugin: good
discovery:
  plugin: major"
check wrong_kind 1 'emx-discovery-good\.so|has no emx_discovery_plugin|transport' "server:
  name: e
platform:
  app_key_file: appkey
transport:
  plugin: good
discovery:
  plugin: wrongkind"
check missing_plugin 1 'emx-discovery-nothere\.so' "server:
  name: e
platform:
  app_key_file: appkey
transport:
  plugin: good
discovery:
  plugin: nothere"
check many_errors 1 '^many_errors.yaml:5: platform\.high_watermark: .*' "server:
  name: e
platform:
  app_key_file: appkey
  high_watermark: lots
  bogus: 1
transport:
  plugin: good
discovery:
  plugin: good"
check no_app_key 1 'platform\.app_key: no platform app key' "server:
  name: e
transport:
  plugin: good
discovery:
  plugin: good" 

printf 'bad\001key\n' >"$work/ctlkey" && chmod 600 "$work/ctlkey"
check control_char_key 1 'platform\.app_key: the app key contains a control character' "server:
  name: e
platform:
  app_key_file: ctlkey
transport:
  plugin: good
discovery:
  plugin: good"

chmod 644 "$work/appkey"
check readable_key 1 'platform\.app_key_file: .*readable by everyone' "$base"
chmod 600 "$work/appkey"

# The key never appears in any output.
printf 'server:\n  name: e\nplatform:\n  app_key: s3cr3t-app-key\n  high_watermark: x\ntransport:\n  plugin: good\ndiscovery:\n  plugin: good\n' >"$work/secret.yaml"
if (cd "$work" && "$bin" -t -c secret.yaml -p "$plugins" 2>&1) | grep -q 's3cr3t'; then
  echo 'FAIL secret: the app key appeared in the output'; fails=$((fails + 1))
else
  echo 'ok   secret'
fi

"$bin" --version | grep -qE '^edgemux [0-9.]+ \(plugin ABI 1\.[0-9]+\)$' && echo 'ok   version' || { echo 'FAIL version'; fails=$((fails + 1)); }
"$bin" --help | grep -q 'platform.high_watermark' && echo 'ok   help' || { echo 'FAIL help'; fails=$((fails + 1)); }
"$bin" >/dev/null 2>&1; [ $? -eq 2 ] && echo 'ok   usage' || { echo 'FAIL usage'; fails=$((fails + 1)); }

[ "$fails" -eq 0 ]
