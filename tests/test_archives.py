import io
import stat
import zipfile

import pytest

from eagle.archives import ArchiveError, extract_zip


def _zip(members: dict[str, bytes], *, link: str | None = None) -> io.BytesIO:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            z.writestr(name, data)
        if link:
            info = zipfile.ZipInfo(link)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            z.writestr(info, "/etc/passwd")
    buf.seek(0)
    return buf


def test_extracts_nested_files_and_skips_hidden_and_macos_forks(tmp_path):
    files = extract_zip(_zip({"a/b.png": b"1", "c.png": b"2", "__MACOSX/._c.png": b"x", ".DS_Store": b"x"}), tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in files] == ["a/b.png", "c.png"]
    assert (tmp_path / "a" / "b.png").read_bytes() == b"1"


def test_suffix_filter(tmp_path):
    files = extract_zip(_zip({"x.png": b"1", "notes.txt": b"2"}), tmp_path, suffixes={".png"})
    assert [p.name for p in files] == ["x.png"]


@pytest.mark.parametrize("name", ["../evil.png", "/abs/evil.png", "a/../../evil.png", "C:/evil.png"])
def test_path_traversal_is_refused_before_writing(tmp_path, name):
    with pytest.raises(ArchiveError, match="unsafe path"):
        extract_zip(_zip({"ok.png": b"1", name: b"2"}), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "evil.png").exists()


def test_links_are_refused(tmp_path):
    with pytest.raises(ArchiveError, match="links"):
        extract_zip(_zip({}, link="link.png"), tmp_path)


def test_limits_and_bombs(tmp_path):
    with pytest.raises(ArchiveError, match="members"):
        extract_zip(_zip({f"{i}.png": b"x" for i in range(5)}), tmp_path, max_members=4)
    with pytest.raises(ArchiveError, match="expands to"):
        extract_zip(_zip({"a.png": b"x" * 1000}), tmp_path, max_total_bytes=999)
    with pytest.raises(ArchiveError, match="ratio"):
        extract_zip(_zip({"bomb.png": b"\0" * 5_000_000}), tmp_path)


def test_not_a_zip(tmp_path):
    with pytest.raises(ArchiveError, match="not a readable zip"):
        extract_zip(io.BytesIO(b"hello"), tmp_path)
