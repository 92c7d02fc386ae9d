#!/usr/bin/env bash
# Make sure a RabbitMQ broker answers on 127.0.0.1:5672: start the installed one if it is down.
set -euo pipefail

port_open() { (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; }

if port_open; then
  echo "RabbitMQ: running on 127.0.0.1:5672"
  exit 0
fi
if ! command -v rabbitmq-server >/dev/null 2>&1; then
  echo "RabbitMQ is not running and not installed." >&2
  echo "Install it (Debian/Ubuntu: sudo apt-get install rabbitmq-server), or point HOTQ_AMQP_URL at a broker." >&2
  exit 1
fi
echo "RabbitMQ: starting (rabbitmq-server -detached)..."
rabbitmq-server -detached
for _ in $(seq 1 120); do
  if port_open; then
    echo "RabbitMQ: up"
    exit 0
  fi
  sleep 0.5
done
echo "RabbitMQ did not come up within 60 s; see its logs (/var/log/rabbitmq)." >&2
exit 1
