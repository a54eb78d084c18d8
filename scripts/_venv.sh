# Sourced by scripts/*: make sure .venv exists and has fedmq installed with the given extras.
# The install is skipped when pyproject.toml and the extras are unchanged since the last one.
ensure_venv() {
    local extras="$1"
    local py="${PYTHON:-python3}"
    if [ ! -x .venv/bin/python ]; then
        echo "creating .venv with $($py --version)" >&2
        "$py" -m venv .venv || {
            echo "python3 -m venv failed: on Debian/Ubuntu run 'apt-get install python3-venv'" >&2
            exit 1
        }
    fi
    local stamp=".venv/.fedmq-installed-$extras"
    local want
    want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
    if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
        echo "installing fedmq[$extras] into .venv" >&2
        .venv/bin/python -m pip install --quiet --upgrade pip >&2
        .venv/bin/python -m pip install --quiet -e ".[$extras]" >&2
        echo "$want" > "$stamp"
    fi
}

# Install Debian's mosquitto when no binary is found and we may use apt-get.
ensure_mosquitto() {
    # mosquitto_sub (mosquitto-clients) too: tests/integration/test_app_docs.py runs docs/apps.md.
    if { command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ]; } \
            && command -v mosquitto_sub >/dev/null 2>&1; then
        return 0
    fi
    local sudo=""
    if [ "$(id -u)" != 0 ]; then
        if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
            sudo="sudo -n"
        else
            echo "mosquitto is missing and apt-get needs root: run 'sudo apt-get install" \
                 "mosquitto mosquitto-clients' (tests that need a broker will fail without it)" >&2
            return 0
        fi
    fi
    echo "installing mosquitto and mosquitto-clients with apt-get" >&2
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2 || true
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto mosquitto-clients >&2
}

# Install Debian's prometheus (for tests/integration/test_prometheus.py) when /usr/bin/prometheus
# is missing and we may use apt-get. The package's postinst would start a system Prometheus on
# :9090; a policy-rc.d that answers 101 ("action forbidden") stops that, and only a binary that
# is really there afterwards counts as success (a failed service start must not fail the run).
ensure_prometheus() {
    if [ -x /usr/bin/prometheus ] || command -v prometheus >/dev/null 2>&1; then
        return 0
    fi
    local sudo=""
    if [ "$(id -u)" != 0 ]; then
        if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
            sudo="sudo -n"
        else
            echo "prometheus is missing and apt-get needs root: run 'sudo apt-get install" \
                 "prometheus' (the Prometheus scrape test is skipped without it, or fails" \
                 "under CI)" >&2
            return 0
        fi
    fi
    local policy=/usr/sbin/policy-rc.d made_policy=""
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' | $sudo tee "$policy" >/dev/null && $sudo chmod 755 "$policy" \
            && made_policy=1
    fi
    echo "installing prometheus with apt-get" >&2
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2 || true
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        prometheus >&2 || true
    if [ -n "$made_policy" ]; then
        $sudo rm -f "$policy"
    fi
    if [ ! -x /usr/bin/prometheus ]; then
        echo "apt-get install prometheus failed: the Prometheus scrape test is skipped (or fails" \
             "under CI)" >&2
    fi
}

# Install Debian's tmux (tests/integration/test_watch_tmux.py drives `fedmq watch` in a real
# terminal) when it is missing and we may use apt-get.
ensure_tmux() {
    if command -v tmux >/dev/null 2>&1; then
        return 0
    fi
    local sudo=""
    if [ "$(id -u)" != 0 ]; then
        if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
            sudo="sudo -n"
        else
            echo "tmux is missing and apt-get needs root: run 'sudo apt-get install tmux'" \
                 "(the fedmq watch terminal test is skipped without it, or fails under CI)" >&2
            return 0
        fi
    fi
    echo "installing tmux with apt-get" >&2
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2 || true
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq tmux >&2
}
