#!/usr/bin/env bash
# Make sure a RabbitMQ broker answers AMQP on 127.0.0.1:5672: start the installed one if it is down,
# restart it if it accepts connections but no longer answers (a hung broker fails every test slowly).
set -euo pipefail

port_open() { (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; }

# A broker that works answers the AMQP 0-9-1 protocol header with a method frame (type 1,
# Connection.Start). A broker out of file handles accepts the TCP connection and then says nothing.
answers_amqp() {
  local first_byte
  first_byte=$(timeout 20 bash -c \
    'exec 3<>/dev/tcp/127.0.0.1/5672; printf "AMQP\x00\x00\x09\x01" >&3; head -c 1 <&3 | od -An -tx1' \
    2>/dev/null | tr -d ' ') || return 1
  [[ "$first_byte" == "01" ]]
}

start_broker() {
  echo "RabbitMQ: starting (rabbitmq-server -detached)..."
  rabbitmq-server -detached
  for _ in $(seq 1 240); do
    if port_open && answers_amqp; then
      echo "RabbitMQ: up"
      return 0
    fi
    sleep 0.5
  done
  echo "RabbitMQ did not come up within 2 minutes; see its logs (/var/log/rabbitmq)." >&2
  return 1
}

if port_open; then
  if answers_amqp; then
    echo "RabbitMQ: running on 127.0.0.1:5672"
    exit 0
  fi
  echo "RabbitMQ: 127.0.0.1:5672 accepts connections but does not answer AMQP within 20 s." >&2
  if ! command -v rabbitmq-server >/dev/null 2>&1 || [[ $(id -u) -ne 0 ]]; then
    echo "Restart that broker (or point HOTQ_AMQP_URL at another one)." >&2
    exit 1
  fi
  echo "RabbitMQ: restarting the hung local broker" >&2
  timeout 60 rabbitmqctl stop >/dev/null 2>&1 || pkill -KILL -u rabbitmq -f beam.smp || true
  for _ in $(seq 1 120); do
    port_open || break
    sleep 0.5
  done
  start_broker
  exit $?
fi
if ! command -v rabbitmq-server >/dev/null 2>&1; then
  echo "RabbitMQ is not running and not installed." >&2
  echo "Install it (Debian/Ubuntu: sudo apt-get install rabbitmq-server), or point HOTQ_AMQP_URL at a broker." >&2
  exit 1
fi
start_broker
