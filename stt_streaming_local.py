#!/usr/bin/env python3
"""Local variant: the streaming worker running openai-whisper in-process (CUDA, ROCm or CPU).

Same worker as ``stt worker --engine whisper``; every setting is an environment variable or flag.
"""

import sys

from stt.cli import main

if __name__ == "__main__":
    sys.exit(main(["worker", *sys.argv[1:]], engine="whisper"))
