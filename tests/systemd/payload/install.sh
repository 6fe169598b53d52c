#!/bin/bash
# Runs INSIDE the throw-away container: install dsnode as README's "Install on a host" says, from the
# wheel bound at /opt/dsnode-dist: a venv, the wheel, `dsnode models pull`, `dsnode install-service`.
#
# One shortcut, for the CI budget and because the container has no network: the venv gets dsnode
# itself from the wheel by a real `pip install`, but its dependencies (torch, transformers, aiohttp…)
# come from the test machine's venv, bound read-only at /opt/dsnode-deps and put on the path by a
# .pth line, instead of a 1.2 GB download.
set -euo pipefail
DEPS=/opt/dsnode-deps MODEL=/opt/dsnode-test/model

# --- the venv: /usr/bin/python3, outside /root and /tmp (ProtectHome=, PrivateTmp=) ------------
/usr/bin/python3 -m venv --without-pip /opt/dsnode
site=$(/opt/dsnode/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$DEPS" > "$site/dsnode-test-deps.pth"
/opt/dsnode/bin/python -m pip install -q --no-deps --no-index --ignore-installed --disable-pip-version-check /opt/dsnode-dist/dsnode-*.whl
# dsnode must come from the wheel, not from the checkout the test venv has installed in editable mode
/opt/dsnode/bin/python -c 'import dsnode, sys; sys.exit(not dsnode.__file__.startswith("/opt/dsnode/lib/"))'

# --- test-only timers: a short watchdog and restart delay, so the checks take seconds ----------
mkdir -p /etc/systemd/system/dsnode.service.d
cat > /etc/systemd/system/dsnode.service.d/10-test.conf <<'INI'
[Service]
WatchdogSec=6s
RestartSec=1s
INI

# --- the one-step install, a model from the store, the node's config -----------------------------
cat > /var/tmp/node.toml <<'TOML'
[node]
name = "sdtest"
role = "central"
listen = "127.0.0.1:8000"
drain_timeout = 30

[model]
name = "tiny-dense"
path = "tiny-dense"               # the current version in the model store
backend = "transformers"
threads = 1

[logging]
level = "info"
format = "auto"

[[routing.upstream]]            # nobody there: the test edits its weight and reloads
url = "http://127.0.0.2:9"
weight = 1
TOML
# first without a model: the service is installed and enabled, not started, and says what to do
/opt/dsnode/bin/dsnode install-service --role central --config /var/tmp/node.toml > /var/tmp/first.out
grep -q "is not ready to serve" /var/tmp/first.out
grep -q "model.path: tiny-dense is not in the model store /var/lib/dsnode/models" /var/tmp/first.out
/opt/dsnode/bin/dsnode models pull "$MODEL" --name tiny-dense --quiet
/opt/dsnode/bin/dsnode install-service --role central --config /var/tmp/node.toml   # now it starts
systemd-analyze verify /etc/systemd/system/dsnode.service
echo "installed"
