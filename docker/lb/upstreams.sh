#!/bin/sh
# Runs nginx and keeps its upstream list to the replicas that are ready.
#
# Every INTERVAL seconds: resolve BACKEND (Docker's DNS answers a scaled service's name with every
# replica's address), ask each address's /ready, and when the set of ready replicas changed,
# rewrite /etc/nginx/blip2-upstreams.conf and reload nginx. A reload is graceful: old workers
# finish their requests (streams included) while new ones take new requests. So a replica that is
# loading gets no request, and one that drains (its /ready answers 503 for shutdown_delay_s before
# it stops listening) leaves the rotation within INTERVAL + the probe time; a replica that dies
# between two rounds is covered by nginx's retry on the next replica (see nginx.conf).
set -eu
BACKEND=${BACKEND:-blip2}
BACKEND_PORT=${BACKEND_PORT:-8080}
INTERVAL=${INTERVAL:-1}
PROBE_TIMEOUT=${PROBE_TIMEOUT:-1}
CONF=/etc/nginx/blip2-upstreams.conf

render() {
  if [ -z "$1" ]; then
    # nginx needs one server per upstream: a placeholder that is never used.
    echo "server 127.0.0.1:9 down;"
  else
    for ip in $1; do
      # Passive health beside the probes: one failed attempt takes it out for 10 s.
      echo "server $ip:$BACKEND_PORT max_fails=1 fail_timeout=10s;"
    done
  fi
}

ready_set() {
  for ip in $(getent ahostsv4 "$BACKEND" 2>/dev/null | awk '{print $1}' | sort -u); do
    if curl -fsS -o /dev/null -m "$PROBE_TIMEOUT" "http://$ip:$BACKEND_PORT/ready" 2>/dev/null; then
      echo "$ip"
    fi
  done | sort | tr '\n' ' '
}

current=""
render "" >"$CONF"
nginx -g 'daemon off;' &
nginx_pid=$!
trap 'nginx -s quit 2>/dev/null; wait "$nginx_pid"; exit 0' TERM INT

while kill -0 "$nginx_pid" 2>/dev/null; do
  next=$(ready_set)
  if [ "$next" != "$current" ]; then
    render "$next" >"$CONF.new" && mv "$CONF.new" "$CONF"
    if nginx -t -q 2>/dev/null && nginx -s reload; then
      echo "upstreams: ready replicas now [${next% }] (were [${current% }])" >&2
      current=$next
    fi
  fi
  sleep "$INTERVAL" &
  wait $! || true
done
wait "$nginx_pid"
