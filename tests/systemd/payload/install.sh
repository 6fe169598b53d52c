#!/bin/bash
# Runs INSIDE the throw-away container: install dsnode the way docs/systemd.md tells an operator,
# from the checkout bound at /opt/dsnode-src, then leave the unit installed but not started.
#
# One shortcut, for the CI budget: the venv at /opt/dsnode gets dsnode itself by a real `pip install`,
# but its dependencies (torch, transformers, aiohttp…) come from the test machine's venv, bound
# read-only at /opt/dsnode-deps and put on the path by a .pth line, instead of a 1.2 GB download.
set -euo pipefail
SRC=/opt/dsnode-src DEPS=/opt/dsnode-deps MODEL=/opt/dsnode-test/model

# --- the venv: /usr/bin/python3, outside /root and /tmp (ProtectHome=, PrivateTmp=) ------------
/usr/bin/python3 -m venv --without-pip /opt/dsnode
site=$(/opt/dsnode/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$DEPS" > "$site/dsnode-test-deps.pth"
mkdir -p /var/tmp/dsnode-src
cp -r "$SRC"/pyproject.toml "$SRC"/README.md "$SRC"/daemon "$SRC"/edge "$SRC"/central /var/tmp/dsnode-src/
/opt/dsnode/bin/python -m pip install -q --no-deps --no-index --no-build-isolation --ignore-installed \
    --disable-pip-version-check /var/tmp/dsnode-src
rm -rf /var/tmp/dsnode-src

# --- the unit and its companions --------------------------------------------------------------
install -D -m 0644 "$SRC"/systemd/dsnode.service /etc/systemd/system/dsnode.service
install -D -m 0644 "$SRC"/systemd/dsnode.sysusers /etc/sysusers.d/dsnode.conf
install -D -m 0644 "$SRC"/systemd/dsnode.tmpfiles /etc/tmpfiles.d/dsnode.conf
systemd-sysusers /etc/sysusers.d/dsnode.conf
systemd-tmpfiles --create /etc/tmpfiles.d/dsnode.conf

# --- a model and a config ---------------------------------------------------------------------
cp -r "$MODEL" /var/lib/dsnode/models/tiny-dense
chown -R dsnode:dsnode /var/lib/dsnode/models
cat > /etc/dsnode/dsnode.toml <<'TOML'
[node]
name = "sdtest"
role = "central"
listen = "127.0.0.1:8000"
drain_timeout = 30

[model]
name = "tiny-dense"
path = "/var/lib/dsnode/models/tiny-dense"
backend = "transformers"
threads = 1

[logging]
level = "info"
format = "auto"

[[routing.upstream]]            # nobody there: the test edits its weight and reloads
url = "http://127.0.0.2:9"
weight = 1
TOML
chgrp dsnode /etc/dsnode/dsnode.toml
chmod 0640 /etc/dsnode/dsnode.toml
/opt/dsnode/bin/dsnode check-config /etc/dsnode/dsnode.toml

# --- test-only timers: a short watchdog and restart delay, so the checks take seconds ----------
mkdir -p /etc/systemd/system/dsnode.service.d
cat > /etc/systemd/system/dsnode.service.d/10-test.conf <<'INI'
[Service]
WatchdogSec=6s
RestartSec=1s
INI
systemctl daemon-reload
systemd-analyze verify /etc/systemd/system/dsnode.service
echo "installed"
