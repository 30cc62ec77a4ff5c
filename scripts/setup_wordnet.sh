#!/usr/bin/env bash
# Make WordNet 3.0 readable by nltk without a network at run time (METEOR's synonym stage needs it).
#
# Usage: bash scripts/setup_wordnet.sh [NLTK_DATA_DIR]      (make setup calls it; idempotent)
#        PY=/path/to/python bash scripts/setup_wordnet.sh   (default PY: .venv/bin/python)
#
# NLTK_DATA_DIR defaults to <venv>/nltk_data, a folder nltk searches by itself, so nothing outside the
# virtual environment changes. Sources, first that works:
#   1. WordNet files already installed by Debian (/usr/share/wordnet, packages wordnet-base and
#      wordnet-sense-index);
#   2. nltk's own downloader (needs raw.githubusercontent.com);
#   3. the same Debian packages fetched with `apt-get download` and unpacked here (no root needed).
# nltk reads the Debian files once they are copied (a symlinked folder is not followed the same way)
# and given the `lexnames` file that the Debian packages do not ship.
set -euo pipefail

PY=${PY:-.venv/bin/python}
DEST=${1:-$("$PY" -c 'import sys; print(sys.prefix)')/nltk_data}
WN="$DEST/corpora/wordnet"

loads() {
    NLTK_DATA="$DEST" "$PY" -c "from nltk.corpus import wordnet as wn; wn.ensure_loaded(); assert wn.synsets('heart')" \
        >/dev/null 2>&1
}

if loads; then
    echo "WordNet: already readable by nltk ($DEST)"
    exit 0
fi

# WordNet 3.0's lexicographer files, in id order (wndb(5WN)); the third column is the part of speech.
write_lexnames() {
    local i=0 name pos
    : >"$WN/lexnames"
    for name in adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body \
        noun.cognition noun.communication noun.event noun.feeling noun.food noun.group noun.location \
        noun.motive noun.object noun.person noun.phenomenon noun.plant noun.possession noun.process \
        noun.quantity noun.relation noun.shape noun.state noun.substance noun.time verb.body verb.change \
        verb.cognition verb.communication verb.competition verb.consumption verb.contact verb.creation \
        verb.emotion verb.motion verb.perception verb.possession verb.social verb.stative verb.weather adj.ppl; do
        case "$name" in noun.*) pos=1 ;; verb.*) pos=2 ;; adj.*) pos=3 ;; adv.*) pos=4 ;; esac
        printf '%02d\t%s\t%s\n' "$i" "$name" "$pos" >>"$WN/lexnames"
        i=$((i + 1))
    done
}

copy_debian() {  # $1: a folder holding the Debian WordNet files (data.noun, index.sense, ...)
    mkdir -p "$WN"
    cp -f "$1"/* "$WN"/
    [ -f "$WN/lexnames" ] || write_lexnames
}

if [ -f /usr/share/wordnet/data.noun ]; then
    copy_debian /usr/share/wordnet
elif "$PY" -c "import nltk, sys; sys.exit(0 if nltk.download('wordnet', download_dir='$DEST', quiet=True, raise_on_error=True) else 1)" \
        >/dev/null 2>&1 && loads; then
    :
else
    command -v apt-get >/dev/null || { echo "WordNet: no apt-get and no download; METEOR will be skipped" >&2; exit 1; }
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    fetch() { (cd "$tmp" && apt-get download -q wordnet-base wordnet-sense-index >/dev/null 2>&1); }
    if ! fetch; then
        # an empty package list (fresh container) needs one update, which needs root
        if [ "$(id -u)" = 0 ]; then apt-get update -q >/dev/null; fetch; else
            echo "WordNet: apt-get download failed; run 'sudo apt-get update' and retry" >&2; exit 1; fi
    fi
    for deb in "$tmp"/*.deb; do dpkg-deb -x "$deb" "$tmp/root"; done
    copy_debian "$tmp/root/usr/share/wordnet"
fi

if loads; then
    echo "WordNet: installed for nltk in $WN"
else
    echo "WordNet: files copied to $WN but nltk cannot read them" >&2
    exit 1
fi
