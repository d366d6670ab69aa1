"""Images for the training recipes (not shipped as remote code): labelled (image, caption) pairs and folders of
unlabelled images, as `datasets.Dataset`s whose every row opens. A bad row (an image that cannot be read, an empty
caption) is reported by name and skipped; a missing column is one `MacCapError`.

Pair sources: a JSONL / CSV / JSON / Parquet file of image paths and captions (paths relative to the file), a folder
holding the images and a captions file (`captions.jsonl`, `captions.csv`, `metadata.jsonl`, `metadata.csv`), or a
`datasets` image dataset (a folder written by `save_to_disk`, or a Hub id) with an image and a caption column.
"""

import io
import logging
from pathlib import Path

from .errors import MacCapError, listing

logger = logging.getLogger(__name__)

PAIR_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
CAPTION_FILES = ("captions.jsonl", "captions.csv", "metadata.jsonl", "metadata.csv")
IMAGE_COLUMNS = ("image", "file_name", "image_path", "path")  # tried in turn when no image column is named
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def open_image(value):
    """An RGB PIL image from a path, a `datasets` Image value ({"bytes", "path"}) or a PIL image; OSError and
    ValueError (PIL's errors for a broken file) propagate."""
    from PIL import Image

    if isinstance(value, Image.Image):
        return value.convert("RGB")
    if isinstance(value, dict):
        value = io.BytesIO(value["bytes"]) if value.get("bytes") else value.get("path")
    if value is None:
        raise ValueError("no image")
    with Image.open(value) as image:
        return image.convert("RGB")  # decodes the whole file: a truncated one fails here, not in a training step


def _readable(value):
    try:
        open_image(value)
        return True
    except (OSError, ValueError, SyntaxError):  # PIL raises all three for broken files
        return False


def _report(where, what, names):
    if names:
        logger.warning(f"{where}: skipped {len(names)} {what}: {listing(names)}")


def _read_table(source, split):
    """(dataset, where, folder image paths are relative to, or None for a datasets image dataset)."""
    import datasets

    path = Path(source)
    if path.is_dir():
        if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise MacCapError(f"pairs {path}: no split {split!r} (splits: {', '.join(loaded)})")
                loaded = loaded[split]
            return loaded, f"pairs dataset {path}", None
        files = [path / name for name in CAPTION_FILES if (path / name).is_file()]
        if not files:
            raise MacCapError(f"pairs folder {path}: no captions file ({', '.join(CAPTION_FILES)})")
        path = files[0]
    elif not path.exists() and not path.suffix:  # a Hub dataset id
        try:
            return datasets.load_dataset(source, split=split), f"Hub dataset {source}", None
        except Exception as error:  # noqa: BLE001 - datasets raises many types; all mean "cannot read it"
            raise MacCapError(f"cannot load pairs {source!r}, split {split!r}: {error}") from None
    where = f"pairs file {path}"
    if not path.is_file():
        raise MacCapError(f"{where}: no such file")
    if path.suffix not in PAIR_FILE_BUILDERS:
        raise MacCapError(f"{where}: unknown format {path.suffix!r}; use {', '.join(PAIR_FILE_BUILDERS)}")
    try:
        table = datasets.load_dataset(PAIR_FILE_BUILDERS[path.suffix], data_files=str(path), split="train")
    except Exception as error:  # noqa: BLE001
        raise MacCapError(f"cannot read {where}: {error}") from None
    return table, where, path.parent


def load_pairs(source, image_column=None, caption_column="caption", split="train"):
    """A `datasets.Dataset` of labelled pairs with columns "name" (the image's path, or "row N"), "image" (a path,
    or a `datasets` Image value) and "caption" (stripped), from `source` (see the module). Rows whose caption is
    empty or not a string, or whose image is missing or unreadable, are logged by name and dropped."""
    import datasets

    table, where, folder = _read_table(source, split)
    columns = table.column_names
    if image_column is None:
        image_column = next((c for c in IMAGE_COLUMNS if c in columns), IMAGE_COLUMNS[0])
    for role, column in (("image", image_column), ("caption", caption_column)):
        if column not in columns:
            raise MacCapError(f"{where} has no {role} column {column!r} (columns: {', '.join(columns)})")
    if isinstance(table.features[image_column], datasets.Image):
        table = table.cast_column(image_column, datasets.Image(decode=False))  # bytes and paths, decoded here

    names, images, captions, empty, unreadable = [], [], [], [], []
    for i, row in enumerate(table):
        value = row[image_column]
        if folder is not None:
            if not isinstance(value, str) or not value.strip():
                unreadable.append(f"row {i} (no image path)")
                continue
            value = str(folder / value)
            name = value
        else:
            name = (value or {}).get("path") or f"row {i}" if isinstance(value, dict) else f"row {i}"
        caption = row[caption_column]
        if not isinstance(caption, str) or not caption.strip():
            empty.append(name)
            continue
        if not _readable(value):
            unreadable.append(name)
            continue
        names.append(name)
        images.append(value)
        captions.append(caption.strip())
    _report(where, "pairs with an empty caption", empty)
    _report(where, "pairs whose image cannot be read", unreadable)
    logger.warning(f"{where}: {len(names)} pairs")
    if not names:
        raise MacCapError(f"{where}: no usable pair (an image that opens and a non-empty caption)")
    if folder is None:  # keep the datasets Image values (bytes): a Hub image has no local path
        return datasets.Dataset.from_dict({"name": names, "image": images, "caption": captions},
                                          features=datasets.Features({"name": datasets.Value("string"),
                                                                      "image": datasets.Image(decode=False),
                                                                      "caption": datasets.Value("string")}))
    return datasets.Dataset.from_dict({"name": names, "image": images, "caption": captions})


def load_image_folder(folder):
    """A `datasets.Dataset` with columns "name" and "image" (paths) of the images in `folder` (its files with an
    image suffix, sorted; subfolders included). Images that cannot be read are logged by name and dropped."""
    import datasets

    folder = Path(folder)
    if not folder.is_dir():
        raise MacCapError(f"--images {folder}: no such folder")
    paths = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    readable = [_readable(p) for p in paths]
    good = [str(p) for p, ok in zip(paths, readable) if ok]
    _report(f"image folder {folder}", "images that cannot be read", [str(p) for p, ok in zip(paths, readable) if not ok])
    logger.warning(f"image folder {folder}: {len(good)} images")
    if not good:
        raise MacCapError(f"--images {folder}: no readable image ({', '.join(IMAGE_SUFFIXES)})")
    return datasets.Dataset.from_dict({"name": good, "image": good})


def pixel_values(processor, values):
    """The CLIP pixel values of a list of image values (paths, `datasets` Image values, PIL images)."""
    return processor.image_processor([open_image(v) for v in values], return_tensors="pt")["pixel_values"]
