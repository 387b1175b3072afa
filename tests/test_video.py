"""Videos and sidecars are written atomically: a final name only ever holds a complete file."""
import json

import imageio.v2 as imageio
import numpy as np
import pytest

from wan_opt import video
from wan_opt.errors import WanOptError


def frames(n=9, h=64, w=96):
    return np.random.default_rng(0).random((n, h, w, 3), dtype=np.float32)


def test_write_video_round_trips_frame_count_and_size(tmp_path):
    path = video.write_video(frames(), tmp_path / "clip.mp4", fps=8)
    with imageio.get_reader(path) as reader:
        assert reader.count_frames() == 9
        assert reader.get_data(0).shape == (64, 96, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4"]


def test_a_failed_encode_leaves_nothing_behind(tmp_path, monkeypatch):
    command = video._ffmpeg_command
    monkeypatch.setattr(video, "_ffmpeg_command", lambda *a: [*command(*a)[:-1], "-crf", "not-a-number", *a[-1:]])
    with pytest.raises(WanOptError, match="nothing was saved under that name"):
        video.write_video(frames(), tmp_path / "clip.mp4", fps=8)
    assert list(tmp_path.iterdir()) == []


def test_write_json_is_atomic_and_utf8(tmp_path):
    path = video.write_json({"prompt": "一只红狐狸"}, tmp_path / "clip.json")
    assert json.loads(path.read_text(encoding="utf-8")) == {"prompt": "一只红狐狸"}
    assert [p.name for p in tmp_path.iterdir()] == ["clip.json"]


@pytest.mark.parametrize("text, stem", [
    ("A red fox: running * fast?", "a-red-fox-running-fast"),
    ('<bad>|"name"/\\', "bad-name"),
    ("一只红狐狸", "video"),
    ("Café au lait", "cafe-au-lait"),
])
def test_safe_stem_has_no_characters_that_break_windows_or_ffmpeg(text, stem):
    assert video.safe_stem(text) == stem


def test_save_never_overwrites(tmp_path):
    (tmp_path / "fox.mp4").write_bytes(b"x")
    path = video.save(frames(), tmp_path, "fox", 8, {"prompt": "fox"})
    assert path.name == "fox-2.mp4" and (tmp_path / "fox.mp4").read_bytes() == b"x"
    assert json.loads(path.with_suffix(".json").read_text()) == {"video": "fox-2.mp4", "prompt": "fox"}


def test_an_unwritable_output_folder_is_rejected(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(WanOptError, match="Cannot write to the output directory"):
        video.check_writable(blocker / "videos")
