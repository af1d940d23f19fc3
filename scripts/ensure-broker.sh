#!/usr/bin/env bash
# Make sure a RabbitMQ broker answers: reuse a running one; else start the installed
# rabbitmq-server; else install it with apt; else run one in Docker when an engine is present.
# Never stops or reconfigures a broker that is already running.
set -euo pipefail
URL=${FEDMQ_BROKER_URL:-amqp://guest:guest@127.0.0.1:5672/%2F}
hostport=$(printf '%s' "$URL" | sed -E 's#^amqps?://([^@/]*@)?([^/:]+)(:([0-9]+))?.*#\2 \4#')
HOST=${hostport% *}; PORT=${hostport#* }; PORT=${PORT:-5672}

answers() { (exec 3<>"/dev/tcp/$HOST/$PORT") 2>/dev/null; }
wait_up() {
  for _ in $(seq 1 90); do answers && return 0; sleep 1; done
  echo "ensure-broker: broker on $HOST:$PORT did not come up in 90 s" >&2; return 1
}

if answers; then echo "ensure-broker: broker answers on $HOST:$PORT"; exit 0; fi
if [ -n "${FEDMQ_BROKER_URL:-}" ] && [ "$HOST" != 127.0.0.1 ] && [ "$HOST" != localhost ]; then
  echo "ensure-broker: FEDMQ_BROKER_URL points at $HOST:$PORT, which does not answer" >&2; exit 3
fi
if ! command -v rabbitmq-server >/dev/null && [ ! -x /usr/sbin/rabbitmq-server ]; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    echo "ensure-broker: installing rabbitmq-server with apt"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rabbitmq-server >/dev/null
  elif command -v docker >/dev/null && docker info >/dev/null 2>&1; then
    echo "ensure-broker: starting rabbitmq:3.10 in Docker"
    docker run -d --rm --name fedmq-rabbitmq -p "$PORT:5672" rabbitmq:3.10 >/dev/null
    wait_up; exit 0
  else
    echo "ensure-broker: no broker on $HOST:$PORT and no way to start one (need root+apt or Docker)" >&2
    exit 3
  fi
fi
if answers; then exit 0; fi  # the package's post-install may have started it
echo "ensure-broker: starting rabbitmq-server -detached"
PATH="$PATH:/usr/sbin" rabbitmq-server -detached
wait_up
echo "ensure-broker: broker answers on $HOST:$PORT"
