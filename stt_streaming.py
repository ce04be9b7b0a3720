#!/usr/bin/env python3
"""HTTP variant: the streaming worker sending segments to a Whisper HTTP service (WHISPER_URL).

Same worker as ``stt worker --engine http``; every setting is an environment variable or flag.
"""

import sys

from stt.cli import main

if __name__ == "__main__":
    sys.exit(main(["worker", *sys.argv[1:]], engine="http"))
