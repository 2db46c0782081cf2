#!/usr/bin/env bash
# Print the two Secrets the manifests mount, with fresh random values; apply them before the kustomization:
#   deploy/make-secrets.sh | kubectl apply -n NAMESPACE -f -
# mx-redis-auth: `password` (read by the sidecars: MX_REDIS_PASSWORD_FILE) and `users.acl` (read by Redis: the
#   default user is off; user `mx` may touch only keys under the MX_REDIS_PREFIX `mx:`, no admin commands).
# mx-auth-key: `key`, the deployment key that signs source records and peer messages (MX_AUTH_KEY_FILE).
# Nothing is written to disk. Rotate by re-running and restarting the pods (Redis first).
set -euo pipefail
kubectl=${KUBECTL:-kubectl}
prefix=${MX_REDIS_PREFIX:-mx}
rand() { od -An -N32 -tx1 /dev/urandom | tr -d ' \n'; }
password=$(rand)
acl=$(printf 'user default off\nuser mx on >%s ~%s:* resetchannels +@all -@dangerous\n' "$password" "$prefix")
"$kubectl" create secret generic mx-redis-auth --dry-run=client -o yaml \
    --from-literal=password="$password" --from-literal=users.acl="$acl"
echo ---
"$kubectl" create secret generic mx-auth-key --dry-run=client -o yaml --from-literal=key="$(rand)"
