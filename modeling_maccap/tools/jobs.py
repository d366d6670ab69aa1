"""What the batch commands (`maccap caption`, `vqa`, `eval`) share, not remote code: a model loaded for inference,
and `JsonlJob`, the engine of `caption` and `vqa`: JSON-lines outputs that survive a kill (each batch is one synced
write; a torn last line is dropped), resumed by skipping what is done, with an errors file for the items that failed.

Only the standard library is imported at module level: the CLI imports the commands to build its parser.
"""

import glob
import json
import os
import re
import sys
from pathlib import Path

from .errors import MacCapError

DTYPES = ("float32", "bfloat16", "float16")


def default_device():
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_inference_model(name, device=None, dtype="float32"):
    """MacCap from a folder or Hub id (the package class, not remote code) with its processor, in eval mode on
    `device` (default: cuda when there is one). What goes wrong is a MacCapError with the reason."""
    import torch

    from ..modeling_maccap import MacCapForConditionalGeneration

    try:
        device = torch.device(device or default_device())
    except RuntimeError as reason:
        raise MacCapError(f"--device {device}: {reason}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MacCapError(f"--device {device}: no CUDA device is available")
    path = Path(name)
    if (path.exists() or path.is_absolute() or str(name).startswith(".")) and not path.is_dir():
        raise MacCapError(f"cannot load the MacCap model {name}: no such folder")  # not a Hub id either
    try:
        model = MacCapForConditionalGeneration.from_pretrained(name, dtype=getattr(torch, dtype))
    except (OSError, ValueError) as reason:
        raise MacCapError(f"cannot load the MacCap model {name}: {reason}") from None
    if model.processor is None:
        raise MacCapError(f"{name} has no processor files (image processor and tokenizers) beside the model: save "
                          "the MacCapProcessor there too")
    try:
        return model.to(device).eval()
    except (RuntimeError, AssertionError) as reason:  # torch built without that device
        raise MacCapError(f"--device {device}: {reason}") from None


# ------------------------------------------------------------------------------------------ JSON lines
def complete_lines(path):
    """The complete lines of a JSONL file (bytes, without the newline) and their byte length. A torn last line
    (no final newline: the writer was killed mid-write) is left out; a missing file has no lines."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return [], 0
    end = data.rfind(b"\n") + 1
    return data[:end].split(b"\n")[:-1], end


def read_records(path, command, fields):
    """The records of a JSONL file `maccap <command>` wrote: JSON objects holding `fields` ({name: type}). A torn
    last line is left out; any other line that is not such a record is a MacCapError naming the file and line."""
    records = []
    for number, line in enumerate(complete_lines(path)[0], 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not all(isinstance(record.get(name), kind) for name, kind in fields.items()):
                raise ValueError
        except (ValueError, AttributeError):  # not JSON, not UTF-8, or not an object with those fields
            names = " and ".join(f'"{name}"' for name in fields)
            raise MacCapError(f"{path}, line {number}: not a record of maccap {command} (a JSON object with "
                              f"{names}); choose another --out") from None
        records.append(record)
    return records


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


def _rewrite(path, records):
    """Replace a file's records atomically (write aside, sync, rename); no records: no file."""
    if not records:
        Path(path).unlink(missing_ok=True)
        return
    temporary = Path(path).with_name(Path(path).name + ".tmp")
    temporary.unlink(missing_ok=True)
    with JsonlAppender(temporary) as writer:
        writer.write(records)
    os.replace(temporary, path)


def shard_path(path, rank):
    return path.with_name(f"{path.name}.rank{rank}")


def with_shards(path):
    """`path` and every process shard of it on disk (this run's and an interrupted run's, whatever its world size)."""
    pattern = re.compile(re.escape(path.name) + r"\.rank\d+")
    return [path, *sorted(p for p in path.parent.glob(glob.escape(path.name) + ".rank*") if pattern.fullmatch(p.name))]


# ----------------------------------------------------------------------------------------------- the job
class JsonlJob:
    """The outputs of one run of `maccap <command>`: a JSON line per item done into `out` (a record holding
    `fields`, {name: type}, the first of them the item's key) and a line per item that failed, with its key and
    "error", into `errors` (default: `out` with the suffix .errors.jsonl), each batch appended, flushed and synced
    as soon as it is done. A killed run keeps every line it wrote (at most a torn last line, dropped on resume).

    Under a launcher each process (`rank` of `world_size`) writes its own shards `<out>.rank<R>` and
    `<errors>.rank<R>`; the first process merges them with `finalize` once all are done.
    """

    def __init__(self, command, out, errors, fields, what, rank=0, world_size=1):
        self.command, self.fields, self.what, self.rank = command, fields, what, rank
        self.key = next(iter(fields))
        self.out = Path(out)
        self.errors = Path(errors) if errors else self.out.with_suffix(".errors.jsonl")
        if self.out.is_dir() or self.errors.resolve() == self.out.resolve():
            raise MacCapError(f"--out {self.out} must be a file, other than the errors file {self.errors}")
        self.mine = self.out if world_size == 1 else shard_path(self.out, rank)
        self.mine_errors = self.errors if world_size == 1 else shard_path(self.errors, rank)

    def _records(self, path):
        return read_records(path, self.command, self.fields)

    def _failures(self, path):
        return read_records(path, self.command, {self.key: self.fields[self.key]})

    def _drop_torn_line(self, path):
        """Cut a torn last line off a file about to be appended to."""
        _, end = complete_lines(path)
        if path.exists() and path.stat().st_size > end:
            os.truncate(path, end)
            print(f"maccap {self.command}: dropped the torn last line of {path}, left by a killed run",
                  file=sys.stderr)

    def start(self, resume, overwrite=False):
        """Open the outputs; returns the keys already done. With `resume`, those in `out` or a shard of it (the
        failed items are tried again). Else an output holding records is refused, unless `overwrite` (one process
        only) removes it, and the earlier run's failures are removed as stale. Every process calls it, and none
        appends before all have."""
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.errors.parent.mkdir(parents=True, exist_ok=True)
        if resume:
            done = {record[self.key] for path in with_shards(self.out) for record in self._records(path)}
            self._drop_torn_line(self.mine)
            self._drop_torn_line(self.mine_errors)
            return done
        if not overwrite:
            for path in with_shards(self.out):
                if path.exists() and path.stat().st_size > 0:
                    raise MacCapError(f"{path} already holds {self.what}: pass --resume to continue that run, or "
                                      "choose another --out")
        if self.rank == 0:
            for path in [*(with_shards(self.out) if overwrite else []), *with_shards(self.errors)]:
                path.unlink(missing_ok=True)
        return set()

    def run(self, batches, run_batch, total, unit, show_progress=True):
        """`run_batch(batch)` -> (records, failures) for each batch in turn, both appended before the next batch
        starts; returns [#records, #failures]. `total`: the items in all batches, for the progress bar."""
        from tqdm.auto import tqdm

        counts = [0, 0]
        with JsonlAppender(self.mine) as records_file, JsonlAppender(self.mine_errors) as failures_file, \
                tqdm(total=total, unit=unit, desc=f"maccap {self.command}", disable=not show_progress) as bar:
            for batch in batches:
                records, failures = run_batch(batch)
                records_file.write(records)
                failures_file.write(failures)
                counts[0] += len(records)
                counts[1] += len(failures)
                bar.update(len(records) + len(failures))
        return counts

    def finalize(self, keys):
        """Merge the process shards into `out` (in the order of `keys`, each item once) and the error shards into
        `errors`, which keeps the latest reason of each item still not done. Shards are deleted only once merged,
        so a run killed here loses nothing and a resumed run merges again. The first process calls it, last."""
        order = {key: index for index, key in enumerate(keys)}

        def position(record):
            return order.get(record[self.key], len(order))

        self._drop_torn_line(self.out)  # left by a run killed while merging; this process appends to `out` next
        done = {record[self.key] for record in self._records(self.out)}
        new = []
        for path in with_shards(self.out)[1:]:
            for record in self._records(path):
                if record[self.key] not in done:
                    done.add(record[self.key])
                    new.append(record)
        new.sort(key=position)
        with JsonlAppender(self.out) as writer:
            writer.write(new)
        self.out.touch()
        for path in with_shards(self.out)[1:]:
            path.unlink()

        failed = {record[self.key]: record for path in with_shards(self.errors) for record in self._failures(path)}
        failed = [record for key, record in failed.items() if key not in done]
        _rewrite(self.errors, sorted(failed, key=position))
        for path in with_shards(self.errors)[1:]:
            path.unlink()


def count(minimum):
    """An argparse type: an integer of at least `minimum`."""
    def parse(text):
        value = int(text)
        if value < minimum:
            raise ValueError
        return value

    parse.__name__ = "positive integer" if minimum else "non-negative integer"  # argparse names it in errors
    return parse
