#!/bin/sh
# Registers the compose cluster's platform instances in ZooKeeper as the
# ThingWorx platform does (Curator ServiceInstance JSON under
# /services/thingworx-http/<id>), then exits. Runs in the zookeeper image.
set -eu
zk=${ZK:-zookeeper:2181}
cli() { zkCli.sh -server "$zk" "$@" >/dev/null 2>&1; }
until cli ls /; do sleep 1; done
cli create /services "" || true
cli create /services/thingworx-http "" || true
for i in 1 2 3; do
  port=$((9000 + i))
  json="{\"name\":\"thingworx-http\",\"id\":\"platform-$i\",\"address\":\"172.28.0.10\",\"port\":$port,\"sslPort\":null,\"payload\":null,\"registrationTimeUTC\":0,\"serviceType\":\"DYNAMIC\",\"uriSpec\":null}"
  cli delete "/services/thingworx-http/platform-$i" || true
  cli create "/services/thingworx-http/platform-$i" "$json"
done
echo "registered platform-1..3 under /services/thingworx-http"
