"""The one error type of the maccap commands, and the pieces their messages share."""

import json
from pathlib import Path


class MacCapError(ValueError):
    """Bad input to a maccap command (a file, a folder, a checkpoint, an option): the message names what and where.
    The command line prints it as one line and exits with status 2; batch jobs record it and go on."""


def listing(names, limit=20):
    """`a, b, c ... and N more`: the first `limit` names, in the order given."""
    names = [str(name) for name in names]
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def read_text(path, what):
    """The text of the file `path` (UTF-8, a BOM allowed). A missing, unreadable or non-UTF-8 file is one
    MacCapError naming `what` and the path."""
    path = Path(path)
    try:
        return path.read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        raise MacCapError(f"{what} {path}: no such file") from None
    except UnicodeDecodeError as error:
        raise MacCapError(f"{what} {path}: not UTF-8 text ({error})") from None
    except OSError as error:
        raise MacCapError(f"{what} {path}: cannot read it ({error.strerror or error})") from None


def read_json(path, what):
    """The JSON value in the file `path`, read by `read_text`; malformed JSON is one MacCapError too."""
    text = read_text(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise MacCapError(f"{what} {path}: not JSON ({error})") from None
