"""What the batch commands (`maccap caption`, `vqa`, `eval`) share, not remote code: a model loaded for inference,
and JSON-lines outputs that survive a kill (each batch is one synced write; a torn last line is dropped).

Only the standard library is imported at module level: the CLI imports the commands to build its parser.
"""

import json
import os
from pathlib import Path

DTYPES = ("float32", "bfloat16", "float16")


def default_device():
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_inference_model(name, device=None, dtype="float32", error=ValueError):
    """MacCap from a folder or Hub id (the package class, not remote code) with its processor, in eval mode on
    `device` (default: cuda when there is one). What goes wrong is raised as `error` with the reason."""
    import torch

    from ..modeling_maccap import MacCapForConditionalGeneration

    try:
        device = torch.device(device or default_device())
    except RuntimeError as reason:
        raise error(f"--device {device}: {reason}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise error(f"--device {device}: no CUDA device is available")
    path = Path(name)
    if (path.exists() or path.is_absolute() or str(name).startswith(".")) and not path.is_dir():
        raise error(f"cannot load the MacCap model {name}: no such folder")  # not a Hub id either
    try:
        model = MacCapForConditionalGeneration.from_pretrained(name, dtype=getattr(torch, dtype))
    except (OSError, ValueError) as reason:
        raise error(f"cannot load the MacCap model {name}: {reason}") from None
    if model.processor is None:
        raise error(f"{name} has no processor files (image processor and tokenizers) beside the model: save the "
                    "MacCapProcessor there too")
    try:
        return model.to(device).eval()
    except (RuntimeError, AssertionError) as reason:  # torch built without that device
        raise error(f"--device {device}: {reason}") from None


def complete_lines(path):
    """The complete lines of a JSONL file (bytes, without the newline) and their byte length. A torn last line
    (no final newline: the writer was killed mid-write) is left out; a missing file has no lines."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return [], 0
    end = data.rfind(b"\n") + 1
    return data[:end].split(b"\n")[:-1], end


def drop_torn_line(path):
    """Cut a torn last line off a file about to be appended to; True when there was one."""
    _, end = complete_lines(path)
    if os.path.exists(path) and os.path.getsize(path) > end:
        os.truncate(path, end)
        return True
    return False


class JsonlAppender:
    """Appends records to a JSONL file, each batch in one write, flushed and synced; the file opens on first use."""

    def __init__(self, path):
        self.path, self.file = Path(path), None

    def write(self, records):
        if not records:
            return
        if self.file is None:
            self.file = open(self.path, "a", encoding="utf-8")
        self.file.write("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self):
        if self.file is not None:
            self.file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


def count(minimum):
    """An argparse type: an integer of at least `minimum`."""
    def parse(text):
        value = int(text)
        if value < minimum:
            raise ValueError
        return value

    parse.__name__ = "positive integer" if minimum else "non-negative integer"  # argparse names it in errors
    return parse
