"""`maccap caption`: caption image files, folders, globs or a `datasets` image dataset into a JSONL file.

The outputs are a `jobs.JsonlJob`: each batch's lines are appended, flushed and synced as soon as it is
captioned, so a killed run keeps every line it wrote (at most a torn last line, which `--resume` drops). An image
that cannot be read goes to the errors file with the reason and the run goes on. Under `torchrun` / `accelerate
launch` every process captions its own share of the inputs into `<out>.rank<R>`; when all are done, the first
process merges the shards into `<out>`.
"""

import glob
import io
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from .errors import MacCapError
from .jobs import DTYPES, JsonlJob, count, default_device, load_inference_model

IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")
# Dataset columns that name an image, tried in this order when --name-column is not given.
NAME_COLUMNS = ("file_name", "filename", "image_name", "image_id", "id")
# What a line of the captions file holds, its key first.
CAPTION_FIELDS = {"image": str, "caption": str}


@dataclass(frozen=True)
class Item:
    """One image to caption. `key` is the output's "image": an absolute file path or dataset:<name>/<split>/<row>.
    `name` is its "image_name"; for dataset rows it is read with the row."""

    key: str
    name: str | None = None
    row: int | None = None


# ------------------------------------------------------------------------------------------------ inputs
def _is_image_file(path):
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS


def folder_images(folder):
    """Image files under `folder`, recursively, sorted by relative path; hidden files and folders are skipped
    (e.g. macOS `._x.jpg` resource forks, `.ipynb_checkpoints`)."""
    folder = Path(folder)
    found = [path for path in folder.rglob("*") if _is_image_file(path)
             and not any(part.startswith(".") for part in path.relative_to(folder).parts)]
    return sorted(found, key=lambda path: path.relative_to(folder).as_posix())


def expand_inputs(inputs):
    """Files (taken as given, whatever their extension), folders and globs -> image paths in order, each once.
    Every input that names nothing is reported in one MacCapError."""
    paths, problems = [], []
    for given in inputs:
        if os.path.exists(given):
            matches = [given]
        elif glob.has_magic(given):  # expanded here: a quoted glob never reached the shell
            matches = sorted(glob.glob(given, recursive=True))
            if not matches:
                problems.append(f"{given}: no files match")
                continue
        else:
            problems.append(f"{given}: no such file or folder")
            continue
        for match in matches:
            if os.path.isdir(match):
                found = folder_images(match)
                if not found and match == given:
                    problems.append(f"{given}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in this folder")
                paths += found
            else:
                paths.append(Path(match))
    if problems:
        raise MacCapError("; ".join(problems))
    seen, unique = set(), []
    for path in paths:
        key = os.path.abspath(path)  # not resolve(): a symlink keeps its own file name (HF cache snapshots)
        if key not in seen:
            seen.add(key)
            unique.append(Item(key=key, name=os.path.basename(key)))
    return unique


class DatasetRows:
    """A `datasets` image dataset read row by row with its images undecoded, so that a corrupt image fails alone,
    here, and not inside `datasets`. `image_column` holds images (the Image feature) or file paths."""

    def __init__(self, data, label, image_column="image", name_column=None):
        import datasets

        feature = data.features.get(image_column)
        if feature is None:
            raise MacCapError(f"--dataset {label}: no column {image_column!r} (columns: "
                              f"{', '.join(data.column_names)}); name the image column with --image-column")
        if isinstance(feature, datasets.Image):
            data = data.cast_column(image_column, datasets.Image(decode=False))
        elif not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
            raise MacCapError(f"--dataset {label}: column {image_column!r} holds {feature}, not images or paths")
        if name_column is None:
            name_column = next((column for column in NAME_COLUMNS if column in data.column_names), None)
        elif name_column not in data.column_names:
            raise MacCapError(f"--dataset {label}: no column {name_column!r} for --name-column (columns: "
                              f"{', '.join(data.column_names)})")
        if len(data) == 0:
            raise MacCapError(f"--dataset {label}: no rows")
        self.label, self.image_column, self.name_column = label, image_column, name_column
        self.view = data.select_columns([image_column] + ([name_column] if name_column else []))

    def items(self):
        return [Item(key=f"dataset:{self.label}/{index}", row=index) for index in range(len(self.view))]

    def read(self, index):
        """(image_name, the image's encoded bytes or its path) of one row. image_name: the name column, else the
        stored file name of the image, else the row index."""
        row = self.view[index]
        value = row[self.image_column]
        path = value.get("path") if isinstance(value, dict) else value
        name = row[self.name_column] if self.name_column else os.path.basename(path) if path else index
        data = value.get("bytes") if isinstance(value, dict) else None
        return str(name), data if data is not None else path


def load_image_dataset(name, config=None, split=None):
    """A folder written by `save_to_disk`, a local folder `load_dataset` reads (an imagefolder, data files), or a
    Hub dataset id -> (Dataset, "<name>/<split>"). `split` may be left out when the dataset has only one."""
    import datasets

    path = Path(name)
    label = os.path.abspath(name) if path.exists() else name
    try:
        if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
            data = datasets.load_from_disk(str(path))
        elif path.exists():
            data = datasets.load_dataset(str(path), config, split=split)
        else:  # a Hub id: look the splits up first rather than download every split to pick one
            if split is None:
                splits = datasets.get_dataset_split_names(name, config)
                if len(splits) != 1:
                    raise MacCapError(f"--dataset {name}: choose a split with --split (splits: "
                                      f"{', '.join(splits)})")
                split = splits[0]
            data = datasets.load_dataset(name, config, split=split)
    except MacCapError:
        raise
    except Exception as error:  # datasets raises many kinds: missing files, unknown ids, no network, bad configs
        raise MacCapError(f"--dataset {name}: cannot load it ({type(error).__name__}: {error})") from None
    if isinstance(data, (datasets.DatasetDict, dict)):
        if split is None and len(data) == 1:
            split = next(iter(data))
        if split not in data:
            what = "choose a split with --split" if split is None else f"no split {split!r}"
            raise MacCapError(f"--dataset {name}: {what} (splits: {', '.join(data)})")
        data = data[split]
    own = str(data.split) if data.split is not None else None
    if split is not None and own is not None and split != own:
        raise MacCapError(f"--dataset {name} holds the split {own!r} only, not {split!r}")
    return data, f"{label}/{split or own or 'train'}"


def shard(items, rank, world_size):
    """This process's share of the inputs: every world_size-th item from `rank` on. Disjoint, together complete,
    balanced to one item, and the same in every process."""
    return items[rank::world_size]


# ---------------------------------------------------------------------------------------- reading images
def _image_from_bytes(data):
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise ValueError("empty image data")
    try:
        return Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ValueError("not an image (or a format PIL cannot read)") from None


def _reason(error, source):
    """The message of a failed image, without load_image's "image 0 (...)" prefix: the record names the image."""
    text = str(error)
    for prefix in (f"image 0 ({source}): ", "image 0: "):
        text = text.removeprefix(prefix)
    return text if isinstance(error, ValueError) else f"{type(error).__name__}: {text}"


def prepare(item, processor, rows=None):
    """Read, decode and preprocess one image: (image_name, processor inputs, None), or (image_name, None, reason)
    when it cannot be used. Never raises, so one bad image cannot stop a batch."""
    name, source = item.name, None
    try:
        name, source = rows.read(item.row) if item.row is not None else (name, item.key)
        if isinstance(source, bytes):
            source = _image_from_bytes(source)
        elif not source:
            raise ValueError("no image in this row")
        elif os.path.isfile(source) and os.path.getsize(source) == 0:
            raise ValueError("empty file (0 bytes)")
        return name, dict(processor(images=[source], return_tensors="pt")), None
    except Exception as error:  # whatever one file does wrong (corrupt, truncated, decompression bomb) is its own
        return name, None, _reason(error, source)


def prepared_batches(batches, work, workers):
    """`[work(item) for item in batch]` for each batch, in order. With workers, the next batch is prepared in
    threads (PIL decodes without the GIL) while the caller captions the current one."""
    if workers == 0:
        yield from ([work(item) for item in batch] for batch in batches)
        return
    with ThreadPoolExecutor(workers) as pool:
        ahead = None
        for batch in batches:
            futures = [pool.submit(work, item) for item in batch]
            if ahead is not None:
                yield [future.result() for future in ahead]
            ahead = futures
        if ahead is not None:
            yield [future.result() for future in ahead]


# ------------------------------------------------------------------------------------------------- model
def caption_batch(model, inputs, generate_kwargs):
    """Captions of preprocessed images (one processor output each), in one `generate` call."""
    import torch

    batch = {key: torch.cat([one[key] for one in inputs]) for key in inputs[0]}
    return model.processor.batch_decode(model.generate(**batch, **generate_kwargs), skip_special_tokens=True)


def generate_options(args):
    """The `generate` keyword arguments set on the command line (the model's defaults for the rest)."""
    if args.no_rerank and args.num_candidates is not None:
        raise MacCapError("--num-candidates has no effect with --no-rerank (one draw per image)")
    options = {"noise_seed": args.noise_seed}
    if args.no_rerank:
        options["rerank"] = False
    for name in ("num_candidates", "num_beams", "max_new_tokens"):
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    return options


# ------------------------------------------------------------------------------------------ processes
def process_position():
    """(rank, world size, local rank) under torchrun / accelerate launch; (0, 1, 0) in a plain process."""
    return (int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
            int(os.environ.get("LOCAL_RANK", "0")))


class Processes:
    """The processes of a launched run, joined through a gloo group (CPU only, whatever device captions)."""

    def __init__(self, world_size):
        self.dist = None
        if world_size > 1:
            import torch.distributed as dist

            # Shares differ by one item, so the final wait is about one batch; the long timeout only keeps a
            # slow last batch from failing the run. A process that dies takes the launcher's group down anyway.
            dist.init_process_group("gloo", timeout=timedelta(hours=24))
            self.dist = dist

    def wait_for_everyone(self):
        if self.dist is not None:
            self.dist.barrier()

    def sum(self, counts):
        if self.dist is None:
            return counts
        import torch

        total = torch.tensor(counts, dtype=torch.long)
        self.dist.all_reduce(total)
        return total.tolist()

    def close(self):
        if self.dist is not None:
            self.dist.destroy_process_group()


# --------------------------------------------------------------------------------------------------- run
def resolve_items(args):
    """Every image of the run, in order: the INPUTS first, then the --dataset rows; (items, DatasetRows or None)."""
    if not args.inputs and not args.dataset:
        raise MacCapError("nothing to caption: give image files, folders or globs, or --dataset")
    items = expand_inputs(args.inputs) if args.inputs else []
    rows = None
    if args.dataset:
        data, label = load_image_dataset(args.dataset, args.dataset_config, args.split)
        rows = DatasetRows(data, label, args.image_column, args.name_column)
        items += rows.items()
    return items, rows


def _warn_repeated_names(items):
    names = {}
    for item in items:
        if item.name is not None:
            names.setdefault(item.name, []).append(item.key)
    repeated = [paths for paths in names.values() if len(paths) > 1]
    if repeated:
        print(f"maccap caption: warning: {len(repeated)} image names occur more than once (e.g. "
              f"{' and '.join(repeated[0][:2])}); evaluation matches captions to references by image_name",
              file=sys.stderr)


def failure_record(item, name, reason):
    """{"image", "image_name" (when it could be read), "error"}: a line of the errors file."""
    return {"image": item.key, **({"image_name": name} if name is not None else {}), "error": reason}


def caption_items(todo, model, rows, generate_kwargs, job, batch_size, workers, show_progress):
    """Caption `todo` batch by batch into `job` (a JsonlJob); returns [captioned, failed]."""
    batches = [todo[start:start + batch_size] for start in range(0, len(todo), batch_size)]
    ready = prepared_batches(batches, lambda item: prepare(item, model.processor, rows), workers)

    def caption_one_batch(prepared_batch):
        batch, prepared = prepared_batch
        good = [(item, name, inputs) for item, (name, inputs, reason) in zip(batch, prepared) if reason is None]
        texts = caption_batch(model, [inputs for _, _, inputs in good], generate_kwargs) if good else []
        captions = [{"image": item.key, "image_name": name, "caption": text}
                    for (item, name, _), text in zip(good, texts)]
        return captions, [failure_record(item, name, reason)
                          for item, (name, _, reason) in zip(batch, prepared) if reason is not None]

    return job.run(zip(batches, ready), caption_one_batch, len(todo), "image", show_progress)


def run(args):
    """`maccap caption`: returns 0 once every image is captioned or recorded as failed."""
    rank, world_size, local_rank = process_position()
    job = JsonlJob("caption", args.out, args.errors, CAPTION_FIELDS, "captions", rank, world_size)
    generate_kwargs = generate_options(args)
    device = args.device or default_device()
    if world_size > 1 and device == "cuda":
        device = f"cuda:{local_rank}"
    items, rows = resolve_items(args)
    if rank == 0:
        _warn_repeated_names(items)

    processes = Processes(world_size)
    try:
        done = job.start(args.resume)
        processes.wait_for_everyone()  # nobody writes before every process has checked the outputs

        share = shard(items, rank, world_size)
        todo = [item for item in share if item.key not in done]
        counts = [0, 0]
        if todo:
            model = load_inference_model(args.model, device, args.dtype)
            print(f"maccap caption: {len(todo)} images to caption with {args.model} on {device} in {args.dtype}"
                  + (f" (process {rank} of {world_size})" if world_size > 1 else ""), file=sys.stderr)
            counts = caption_items(todo, model, rows, generate_kwargs, job, args.batch_size, args.num_workers,
                                   show_progress=rank == 0)
        processes.wait_for_everyone()
        if rank == 0:
            job.finalize([item.key for item in items])
        captioned, failed, skipped = processes.sum([*counts, len(share) - len(todo)])
        if rank == 0:
            print(f"maccap caption: {captioned} captioned, {failed} failed, {skipped} skipped as already done: "
                  f"{job.out}")
            if failed:
                print(f"maccap caption: the reasons of the {failed} failed images are in {job.errors}")
    finally:
        processes.close()
    return 0


def add_parser(commands):
    cap = commands.add_parser(
        "caption", help="caption image files, folders, globs or a datasets image dataset into a JSONL file",
        description="Caption images into JSONL, one {image, image_name, caption} per line, written batch by batch. "
                    "Unreadable images go to the errors file and the run goes on. Under torchrun / accelerate launch "
                    "every process captions its share and the first merges them.")
    cap.add_argument("model", metavar="MODEL", help="MacCap folder or Hub id, with its processor files")
    cap.add_argument("inputs", nargs="*", metavar="INPUT",
                     help="image files, folders (searched recursively for image files) or globs ('imgs/**/*.jpg')")
    cap.add_argument("--out", required=True, help="the JSONL file of captions")
    cap.add_argument("--errors", help="the JSONL file of images that could not be read, with the reason "
                                      "(default: OUT with the suffix .errors.jsonl)")
    cap.add_argument("--resume", action="store_true", help="continue an interrupted run: skip the images already in "
                                                           "OUT, retry those that failed")
    cap.add_argument("--dataset", metavar="NAME_OR_PATH", help="a datasets image dataset: Hub id, save_to_disk "
                                                               "folder, or a folder load_dataset reads (imagefolder)")
    cap.add_argument("--dataset-config", help="the --dataset configuration name, if it has several")
    cap.add_argument("--split", help="the --dataset split (needed only when it has several)")
    cap.add_argument("--image-column", default="image", help="column of images or image paths (default: %(default)s)")
    cap.add_argument("--name-column", help="column giving image_name (default: the first of "
                                           f"{', '.join(NAME_COLUMNS)}; else the image's file name; else the row)")
    cap.add_argument("--batch-size", type=count(1), default=16, help="images per generate call (default: %(default)s)")
    cap.add_argument("--num-workers", type=count(0), default=4,
                     help="threads decoding the next batch while one is captioned; 0: none (default: %(default)s)")
    cap.add_argument("--device", help="torch device (default: cuda if available, else cpu; under a launcher each "
                                      "process takes cuda:LOCAL_RANK)")
    cap.add_argument("--dtype", choices=DTYPES, default="float32",
                     help="weights' dtype (default: %(default)s, the captions of the Python API; bfloat16 is faster "
                          "on recent GPUs but may change some captions)")
    cap.add_argument("--num-candidates", type=count(1), help="noisy candidates per image, reranked by CLIP "
                                                              "(default: the model's config, 4)")
    cap.add_argument("--no-rerank", action="store_true", help="one noisy draw per image, no CLIP reranking")
    cap.add_argument("--num-beams", type=count(1), help="beams of the LM (default: the generation config, 4)")
    cap.add_argument("--max-new-tokens", type=count(1),
                     help="caption length limit in LM tokens (default: the generation config, 16)")
    cap.add_argument("--noise-seed", type=int, default=0, help="seed of the per-image noise (default: %(default)s)")
    cap.set_defaults(run=run)
    return cap
