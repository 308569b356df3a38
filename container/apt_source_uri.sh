#!/usr/bin/env bash
# Print the first Debian archive URI this machine's own apt sources give for a release, so that
# image_test.sh fetches from whatever archive the host is set up to use (and names none itself).
# Usage: apt_source_uri.sh RELEASE [APT_DIR]   (APT_DIR: default /etc/apt)
# Reads deb822 APT_DIR/sources.list.d/*.sources first, then one-line APT_DIR/sources.list and
# APT_DIR/sources.list.d/*.list. Only `deb` entries whose suites include RELEASE count. Exits 1,
# saying so on stderr, when there is none.
set -euo pipefail

release="${1:?usage: apt_source_uri.sh RELEASE [APT_DIR]}"
apt_dir="${2:-/etc/apt}"
sources=() lists=()
for path in "$apt_dir"/sources.list.d/*.sources; do [[ -f "$path" ]] && sources+=("$path"); done
for path in "$apt_dir"/sources.list "$apt_dir"/sources.list.d/*.list; do
    [[ -f "$path" ]] && lists+=("$path")
done

uri=""
if ((${#sources[@]})); then
    uri="$(awk -v rel="$release" '
        function stanza_end() {
            if (!found && types ~ /(^| )deb( |$)/ && (suites " ") ~ (" " rel " ") && uri != "") {
                print uri; found = 1; exit
            }
            types = suites = uri = ""
        }
        FNR == 1 { stanza_end() }
        /^[[:space:]]*$/ { stanza_end(); next }
        /^[[:space:]]*#/ { next }
        tolower($1) == "types:" { $1 = ""; types = $0 }
        tolower($1) == "uris:" { uri = $2 }
        tolower($1) == "suites:" { $1 = ""; suites = $0 }
        END { stanza_end() }' "${sources[@]}")"
fi
if [[ -z "$uri" ]] && ((${#lists[@]})); then
    uri="$(awk -v rel="$release" '
        $1 == "deb" {
            i = 2
            if ($i ~ /^\[/) { while (i < NF && $i !~ /\]$/) i++; i++ }
            if ($(i + 1) == rel) { print $i; exit }
        }' "${lists[@]}")"
fi
if [[ -z "$uri" ]]; then
    echo "no deb source for $release in $apt_dir/sources.list.d/*.sources, $apt_dir/sources.list" \
         "or $apt_dir/sources.list.d/*.list" >&2
    exit 1
fi
echo "$uri"
