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
    if command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ]; then
        return 0
    fi
    local sudo=""
    if [ "$(id -u)" != 0 ]; then
        if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
            sudo="sudo -n"
        else
            echo "mosquitto is missing and apt-get needs root: run 'sudo apt-get install" \
                 "mosquitto' (tests that need a broker will fail without it)" >&2
            return 0
        fi
    fi
    echo "installing mosquitto with apt-get" >&2
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2 || true
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto >&2
}
