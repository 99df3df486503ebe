"""The fixture of the owndata tests: a small corpus of your own in each input form."""
from __future__ import annotations

from pathlib import Path

import pytest

from owndata_fixtures import write_coco, write_img2dataset, write_text


@pytest.fixture
def mydata(tmp_path) -> Path:
    """``tmp_path/mydata`` holding captions.json + images/ (one corrupt JPEG, 011.jpg), web/
    (img2dataset shards whose first sample lacks its caption) and text.txt."""
    root = tmp_path / "mydata"
    write_coco(root, corrupt=(11,))
    write_img2dataset(root / "web", first_without_caption=True)
    write_text(root / "text.txt")
    return root
