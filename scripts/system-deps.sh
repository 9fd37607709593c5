#!/usr/bin/env bash
# shellcheck disable=SC2086,SC2116  # package lists are split into words on purpose
# The system libraries that `make test` and `make demo` need besides Python packages:
# Xvfb (the virtual display pytest-xvfb starts for the GUI tests) and the libraries Qt's
# xcb platform plugin loads (without them Python aborts: "Fatal Python error: Aborted").
#
#   scripts/system-deps.sh           for `make test`: Xvfb + Qt's xcb libraries
#   scripts/system-deps.sh --window  for `make demo` with a display: Qt's xcb libraries only
#
# Debian/Ubuntu (dpkg + apt-get): packages missing by `dpkg -s` are installed with apt-get when
#   running as root, with `sudo -n apt-get` where sudo needs no password; otherwise it stops
#   (exit 1) with one line: the exact command to run.
# Other Linux: it cannot check package names. If Xvfb is on PATH (or --window) it goes on with a
#   one-line note; otherwise it stops (exit 1) with one line naming what to install.
# macOS/Windows: nothing to install (Xvfb is Linux-only; the GUI tests use the native display).
# MICROCLF_SKIP_SYSTEM_DEPS=1 skips every check (e.g. you manage these libraries yourself).
set -euo pipefail

QT_PKGS="libxcb-icccm4 libxcb-keysyms1 libxcb-xinerama0 libxcb-cursor0 libxkbcommon-x11-0
 libxcb-randr0 libxcb-render-util0 libxcb-shape0 libxcb-image0 libgl1 libegl1 libfontconfig1
 libdbus-1-3"
XVFB_PKGS="xvfb xauth"
# The same libraries under Fedora/RHEL and Arch names (for the message on those systems).
DNF_XVFB="xorg-x11-server-Xvfb xorg-x11-xauth"
DNF_QT="xcb-util-wm xcb-util-keysyms xcb-util-cursor xcb-util-renderutil xcb-util-image
 libxkbcommon-x11 libxcb mesa-libGL mesa-libEGL fontconfig dbus-libs"
PACMAN_XVFB="xorg-server-xvfb xorg-xauth"
PACMAN_QT="xcb-util-wm xcb-util-keysyms xcb-util-cursor xcb-util-renderutil xcb-util-image
 libxkbcommon-x11 libxcb libglvnd mesa fontconfig dbus"

me="scripts/system-deps.sh"
window=0
target="make test"
case "${1:-}" in
    --window) window=1; target="make demo" ;;
    "") ;;
    *) echo "usage: $me [--window]" >&2; exit 2 ;;
esac

if [ -n "${MICROCLF_SKIP_SYSTEM_DEPS:-}" ]; then
    exit 0
fi

case "$(uname -s)" in
    Linux) ;;
    Darwin | MINGW* | MSYS* | CYGWIN* | Windows*)
        echo "$me: nothing to install here: Xvfb is Linux-only; on macOS and Windows the GUI" \
             "tests and the demo use the native display."
        exit 0 ;;
    *)
        echo "$me: $(uname -s) is not Linux, macOS or Windows: not checking system libraries" \
             "(needed: an X server or Xvfb, and the libraries Qt's xcb plugin loads)."
        exit 0 ;;
esac

if [ "$window" = 1 ]; then
    XVFB_PKGS="" DNF_XVFB="" PACMAN_XVFB="" generic=""
else
    generic="Xvfb, xauth, "
fi

# -- not Debian/Ubuntu ------------------------------------------------------------------------
if ! command -v dpkg >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1; then
    if command -v dnf >/dev/null 2>&1; then
        how="sudo dnf install -y $(echo $DNF_XVFB $DNF_QT)"
    elif command -v pacman >/dev/null 2>&1; then
        how="sudo pacman -S --needed $(echo $PACMAN_XVFB $PACMAN_QT)"
    else
        how="your package manager's packages for: ${generic}libxcb-icccm, libxcb-keysyms,"
        how="$how libxcb-xinerama, libxcb-cursor, libxkbcommon-x11, libxcb-randr,"
        how="$how libxcb-render-util, libxcb-shape, libxcb-image, libGL, libEGL, fontconfig, dbus"
    fi
    if [ "$window" = 1 ] || command -v Xvfb >/dev/null 2>&1; then
        echo "$me: not Debian/Ubuntu, so Qt's xcb libraries are not checked; if Qt aborts" \
             "('could not load the Qt platform plugin \"xcb\"'), install: $how"
        exit 0
    fi
    echo "$me: Xvfb not found and this is not Debian/Ubuntu; install it and Qt's xcb" \
         "libraries, then run $target again: $how" >&2
    exit 1
fi

# -- Debian/Ubuntu ----------------------------------------------------------------------------
missing=""
for p in $XVFB_PKGS $QT_PKGS; do
    # `dpkg -s` succeeds for a removed package whose config files remain: read its Status.
    if ! dpkg -s "$p" 2>/dev/null | grep -q '^Status: install ok installed'; then
        missing="$missing $p"
    fi
done
missing=${missing# }
[ -z "$missing" ] && exit 0

install_args="install -y -qq --no-install-recommends $missing"
if [ "$(id -u)" = 0 ]; then
    as_root=""
elif command -v sudo >/dev/null 2>&1 && sudo -n true >/dev/null 2>&1; then
    as_root="sudo -n"
else
    if command -v sudo >/dev/null 2>&1; then
        cmd="sudo apt-get update && sudo apt-get install -y --no-install-recommends $missing"
    else
        cmd="su -c 'apt-get update && apt-get install -y --no-install-recommends $missing'"
    fi
    echo "$me: missing system packages ($missing); not root and no password-less sudo, so" \
         "run this, then $target again: $cmd" >&2
    exit 1
fi

echo "$me: installing missing system packages: $missing"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
if ! { $as_root apt-get update -qq &&
       $as_root env DEBIAN_FRONTEND=noninteractive apt-get $install_args; } >"$log" 2>&1
then
    tail -n 20 "$log" >&2
    echo "$me: apt-get failed (above); run it yourself, then $target again:" \
         "${as_root:+sudo }apt-get update &&" \
         "${as_root:+sudo }apt-get install -y --no-install-recommends $missing" >&2
    exit 1
fi
echo "$me: installed: $missing"
