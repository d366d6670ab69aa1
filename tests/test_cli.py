"""The README's main command: `maccap selfcheck`."""

import re

from modeling_maccap.tools.cli import main


def test_selfcheck_reloads_the_saved_model_as_remote_code_with_equal_captions(tmp_path, capsys):
    assert main(["selfcheck", "--out", str(tmp_path)]) == 0
    lines = re.findall(r"in-process '(.*)' \| fresh-process pipeline '(.*)'", capsys.readouterr().out)
    assert len(lines) == 3 and all(mine == theirs for mine, theirs in lines)
    assert (tmp_path / "maccap-tiny" / "modeling_maccap.py").is_file()

