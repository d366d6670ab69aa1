#!/usr/bin/env python3
"""Publish a trained MacCap checkpoint to the Hub (the same as `maccap upload`):

    python upload.py CHECKPOINT_DIR --hub-config hub_configs/X.json --repo-id ORG/NAME [--dry-run]

Stages the exact repo folder (safetensors weights, config with auto_map, processor files, remote code, model
card), then creates the repo and uploads it. `python upload.py --help` lists the options.
"""

import sys

from modeling_maccap.tools.cli import main

if __name__ == "__main__":
    sys.exit(main(["upload", *sys.argv[1:]]))
