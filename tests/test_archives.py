import io
import re
import stat
import struct
import zipfile
from pathlib import PurePosixPath

import pytest

from eagle.archives import (
    RATIO_CHECK_MIN_BYTES,
    ArchiveError,
    ArchiveLimits,
    ArchiveTooLargeError,
    describe_names,
    extract_zip,
    scan_zip,
)


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
    with pytest.raises(ArchiveError, match="unsafe entry name"):
        extract_zip(_zip({"ok.png": b"1", name: b"2"}), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "evil.png").exists()


def test_links_are_refused(tmp_path):
    with pytest.raises(ArchiveError, match="'link.png' is a symbolic link; only files and folders are allowed"):
        extract_zip(_zip({}, link="link.png"), tmp_path)


@pytest.mark.parametrize(
    ("kind", "words"),
    [
        (stat.S_IFIFO, "a named pipe (FIFO)"),
        (stat.S_IFCHR, "a character device"),
        (stat.S_IFBLK, "a block device"),
        (stat.S_IFSOCK, "a socket"),
    ],
)
def test_special_files_are_refused_by_kind_before_writing(tmp_path, kind, words):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("good.png", b"1")
        info = zipfile.ZipInfo("dev/zero.png")
        info.external_attr = (kind | 0o644) << 16
        z.writestr(info, b"")
    with pytest.raises(ArchiveError, match=re.escape(f"entry 'dev/zero.png' is {words}")):
        extract_zip(io.BytesIO(buf.getvalue()), tmp_path / "out", suffixes={".png"})
    assert not (tmp_path / "out").exists()


def test_entries_without_a_unix_mode_and_plain_modes_are_files(tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, mode in (("windows.png", 0), ("unix.png", stat.S_IFREG | 0o600), ("bare-perms.png", 0o644)):
            info = zipfile.ZipInfo(name)
            info.external_attr = mode << 16
            z.writestr(info, name.encode())
        z.writestr(zipfile.ZipInfo("folder/"), b"")
    files = extract_zip(io.BytesIO(buf.getvalue()), tmp_path)
    assert sorted(p.name for p in files) == ["bare-perms.png", "unix.png", "windows.png"]


def test_limits_and_bombs(tmp_path):
    with pytest.raises(ArchiveTooLargeError, match="5 entries; the limit is 4"):
        extract_zip(_zip({f"{i}.png": b"x" for i in range(5)}), tmp_path, ArchiveLimits(max_entries=4))
    with pytest.raises(ArchiveTooLargeError, match="expands to"):
        extract_zip(_zip({"a.png": b"x" * 1000}), tmp_path, ArchiveLimits(max_total_bytes=999))
    with pytest.raises(ArchiveTooLargeError, match="ratio"):
        extract_zip(_zip({"bomb.png": b"\0" * 5_000_000}), tmp_path)


def test_not_a_zip(tmp_path):
    with pytest.raises(ArchiveError, match="not a readable zip"):
        extract_zip(io.BytesIO(b"hello"), tmp_path)


# -- helpers that forge what zipfile will not write --------------------------------------------------------------------
_CENTRAL = b"PK\x01\x02"


def _patch_central(buf: io.BytesIO, offset: int, fmt: str, value: int) -> io.BytesIO:
    """Overwrite one field of the (single) central-directory header; ``scan_zip`` reads only that directory."""
    data = bytearray(buf.getvalue())
    start = data.index(_CENTRAL)
    struct.pack_into(fmt, data, start + offset, value)
    return io.BytesIO(bytes(data))


def _one_entry(name: str | zipfile.ZipInfo = "a.png", data: bytes = b"123456", **kw) -> io.BytesIO:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", **kw) as z:
        z.writestr(name, data)
    buf.seek(0)
    return buf


# -- rules that only the service's checker had before ------------------------------------------------------------------
def test_encrypted_entries_are_refused(tmp_path):
    forged = _patch_central(_one_entry(), 8, "<H", 0x1)  # general-purpose flag bit 0: encrypted
    assert zipfile.ZipFile(forged).infolist()[0].flag_bits & 0x1
    with pytest.raises(ArchiveError, match="'a.png' is encrypted") as err:
        scan_zip(forged)
    assert not isinstance(err.value, ArchiveTooLargeError)
    with pytest.raises(ArchiveError, match="encrypted"):
        extract_zip(forged, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method", [9, 99])  # deflate64, AES: not inflatable by the standard library
def test_unsupported_compression_is_refused(method):
    forged = _patch_central(_one_entry(), 10, "<H", method)
    with pytest.raises(ArchiveError, match=rf"unsupported compression method \({method}\)"):
        scan_zip(forged)


@pytest.mark.parametrize("compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA])
def test_supported_compression_methods_round_trip(tmp_path, compression):
    files = extract_zip(_one_entry(data=b"pixels" * 100, compression=compression), tmp_path)
    assert [p.read_bytes() for p in files] == [b"pixels" * 100]


def test_nul_byte_in_a_name_is_refused():
    buf = _one_entry("good/aXevil.png")
    forged = io.BytesIO(buf.getvalue().replace(b"good/aXevil.png", b"good/a\x00evil.png"))
    assert zipfile.ZipFile(forged).infolist()[0].filename == "good/a"  # zipfile silently cuts the name
    with pytest.raises(ArchiveError, match="unsafe entry name"):
        scan_zip(forged)


@pytest.mark.parametrize("name", ["a\\..\\evil.png", "sub\\x.png", "C:\\evil.png", "D:evil.png", "c:/evil.png"])
def test_backslashes_and_drive_letters_are_refused(tmp_path, name):
    with pytest.raises(ArchiveError, match="unsafe entry name"):
        extract_zip(_zip({"ok.png": b"1", name: b"2"}), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_empty_name_is_refused():
    with pytest.raises(ArchiveError, match="unsafe entry name ''"):
        scan_zip(_one_entry(zipfile.ZipInfo("")))


def test_per_entry_size_limit(tmp_path):
    limits = ArchiveLimits(max_entry_bytes=10)
    assert [i.filename for i in scan_zip(_zip({"a.png": b"x" * 10}), limits)] == ["a.png"]  # at the limit: fine
    with pytest.raises(ArchiveTooLargeError, match="'b.png' unpacks to 11 bytes; the limit is 10"):
        scan_zip(_zip({"a.png": b"x" * 10, "b.png": b"x" * 11}), limits)
    with pytest.raises(ArchiveTooLargeError, match="unpacks to 11 bytes"):
        extract_zip(_zip({"b.png": b"x" * 11}), tmp_path / "out", limits)
    assert not (tmp_path / "out").exists()


# -- the merged rules --------------------------------------------------------------------------------------------------
def test_ratio_is_checked_only_above_one_mib():
    small = _zip({"zeros.png": b"\0" * RATIO_CHECK_MIN_BYTES})  # compresses ~1000:1 but cannot be a bomb
    info = zipfile.ZipFile(small).infolist()[0]
    assert info.file_size / info.compress_size > 200
    assert [i.filename for i in scan_zip(small)] == ["zeros.png"]
    big = _zip({"zeros.png": b"\0" * (RATIO_CHECK_MIN_BYTES + 1)})
    info = zipfile.ZipFile(big).infolist()[0]
    ratio = info.file_size / info.compress_size
    with pytest.raises(ArchiveTooLargeError, match=rf"ratio of {ratio:.0f}:1; the limit is 200:1 \(zip-bomb guard\)"):
        scan_zip(big)
    relaxed = ArchiveLimits(max_ratio=ratio + 1, max_total_ratio=ratio + 1)
    assert scan_zip(big, relaxed)[0].file_size == RATIO_CHECK_MIN_BYTES + 1


def test_total_counts_every_entry_even_skipped_ones():
    files = {"a.png": b"123456", "notes.txt": b"123456"}
    assert [i.filename for i in scan_zip(_zip(files), ArchiveLimits(max_total_bytes=12), suffixes={".png"})] == [
        "a.png"
    ]
    with pytest.raises(ArchiveTooLargeError, match="expands to 12 bytes in 2 entries .*; the limit is 11 bytes"):
        scan_zip(_zip(files), ArchiveLimits(max_total_bytes=11), suffixes={".png"})


def test_skipped_entries_are_still_checked():
    with pytest.raises(ArchiveError, match="symbolic link"):
        scan_zip(_zip({"a.png": b"1"}, link="notes.txt"), suffixes={".png"})
    with pytest.raises(ArchiveError, match="unsafe entry name"):
        scan_zip(_zip({"a.png": b"1", "__MACOSX/../../evil": b"2"}))


def test_scan_lists_content_sorted_without_writing(tmp_path):
    files = {
        "z/b.PNG": b"1",
        "a.jpg": b"2",
        "__MACOSX/._a.jpg": b"3",
        ".hidden/c.png": b"4",
        "doc.txt": b"5",
        "sub/": b"",
    }
    path = tmp_path / "a.zip"
    path.write_bytes(_zip(files).getvalue())
    assert [i.filename for i in scan_zip(path)] == ["a.jpg", "doc.txt", "z/b.PNG"]
    infos = scan_zip(str(path), suffixes={".png", ".jpg"})
    assert [(i.filename, i.file_size) for i in infos] == [("a.jpg", 1), ("z/b.PNG", 1)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.zip"]


def test_size_errors_are_archive_too_large_and_name_errors_are_not():
    with pytest.raises(ArchiveTooLargeError):
        scan_zip(_zip({f"{i}.png": b"x" for i in range(3)}), ArchiveLimits(max_entries=2))
    with pytest.raises(ArchiveError) as err:
        scan_zip(_zip({"../x.png": b"x"}))
    assert not isinstance(err.value, ArchiveTooLargeError)
    assert issubclass(ArchiveTooLargeError, ArchiveError) and issubclass(ArchiveError, ValueError)


def test_extraction_never_writes_more_than_the_header_declares(tmp_path):
    # The central directory claims 3 bytes for a 6-byte stored entry: the limits were checked on 3.
    forged = _patch_central(_one_entry(data=b"123456"), 24, "<I", 3)
    assert zipfile.ZipFile(forged).infolist()[0].file_size == 3
    with pytest.raises(ArchiveError, match="corrupt entry 'a.png'|larger than its header"):
        extract_zip(forged, tmp_path)
    written = tmp_path / "a.png"
    assert not written.exists() or written.stat().st_size <= 3


# -- limits in total ----------------------------------------------------------------------------------
def _many_zeros(count: int, size: int = 1024 * 1024) -> io.BytesIO:
    """``count`` entries of ``size`` zero bytes each: every entry stays at the per-entry ratio threshold."""
    buf = io.BytesIO()
    chunk = b"\0" * size
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for i in range(count):
            z.writestr(f"refs/{i:04d}.png", chunk)
    buf.seek(0)
    return buf


def test_many_small_bomb_entries_are_refused_by_the_total_ratio_before_writing(tmp_path):
    bomb = _many_zeros(300)  # 300 MiB declared from ~300 KB: each entry passes the per-entry check
    assert len(bomb.getvalue()) < 1024 * 1024
    out = tmp_path / "out"
    with pytest.raises(ArchiveTooLargeError, match=r"ratio of \d+:1 over 300 entries") as err:
        extract_zip(bomb, out)
    assert not out.exists()
    message = str(err.value)
    assert "'refs/0000.png', 'refs/0001.png', 'refs/0002.png' and 297 more" in message
    assert "refs/0003.png" not in message and "\n" not in message


def test_many_small_entries_are_refused_by_limits_sized_for_them(tmp_path):
    bomb = _many_zeros(300)
    permissive_ratio = dict(max_ratio=1e9, max_total_ratio=1e9)
    with pytest.raises(ArchiveTooLargeError, match="expands to 300.0 MiB in 300 entries"):
        extract_zip(bomb, tmp_path / "a", ArchiveLimits(max_total_bytes=100 * 1024 * 1024, **permissive_ratio))
    with pytest.raises(ArchiveTooLargeError, match="300 entries; the limit is 100"):
        extract_zip(bomb, tmp_path / "b", ArchiveLimits(max_entries=100, **permissive_ratio))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_total_ratio_ignores_small_archives_and_honours_its_limit():
    small = _zip({f"{i}.txt": b"a" * 1000 for i in range(50)})  # 50 KB of text compresses well: no bomb
    assert len(scan_zip(small)) == 50
    bomb = _many_zeros(3)
    with pytest.raises(ArchiveTooLargeError, match="the limit is 100:1"):
        scan_zip(bomb)
    assert len(scan_zip(_many_zeros(3), ArchiveLimits(max_total_ratio=1e9))) == 3


def test_entry_count_is_read_from_the_end_record_before_parsing(monkeypatch):
    archive = _zip({f"{i}.png": b"x" for i in range(5)})
    parsed = []
    original = zipfile.ZipFile.__init__
    monkeypatch.setattr(zipfile.ZipFile, "__init__", lambda self, *a, **k: parsed.append(1) or original(self, *a, **k))
    with pytest.raises(ArchiveTooLargeError, match="5 entries; the limit is 4"):
        scan_zip(archive, ArchiveLimits(max_entries=4))
    assert parsed == []  # refused before zipfile built its list of entries
    assert archive.tell() == 0  # a file object is left where it was


def test_keep_selects_and_renames_entries(tmp_path):
    archive = _zip({"bank/meta.json": b"{}", "bank/notes.txt": b"x", "other/meta.json": b"{}"})
    prefix = PurePosixPath("bank")

    def keep(path):
        return path.relative_to(prefix) if path.parts[0] == "bank" and path.suffix == ".json" else None

    files = extract_zip(archive, tmp_path / "out", keep=keep)
    assert [p.relative_to(tmp_path / "out").as_posix() for p in files] == ["meta.json"]
    assert sorted(p.name for p in (tmp_path / "out").rglob("*")) == ["meta.json"]
    with pytest.raises(ArchiveError, match="unsafe path"):
        extract_zip(_zip({"a.txt": b"x"}), tmp_path / "bad", keep=lambda p: PurePosixPath("../a.txt"))
    assert not (tmp_path / "bad").exists()


def test_describe_names_lists_at_most_three():
    assert describe_names([]) == ""
    assert describe_names(["a"]) == "'a'"
    assert describe_names(["a", "b", "c"]) == "'a', 'b', 'c'"
    assert describe_names([str(i) for i in range(10)]) == "'0', '1', '2' and 7 more"


def test_limits_from_settings():
    from eagle.settings import Settings

    limits = ArchiveLimits.from_settings(Settings(service={"max_archive_entries": 7, "max_archive_unpacked_mb": 3}))
    assert limits.max_entries == 7 and limits.max_total_bytes == 3 * 1024 * 1024
    assert limits.max_entry_bytes == 3 * 1024 * 1024 and limits.max_total_ratio == ArchiveLimits().max_total_ratio


def test_the_apps_reference_upload_uses_the_same_limits(tmp_path):
    from app.uploads import collect_reference_files
    from eagle.settings import Settings

    bomb = tmp_path / "refs.zip"
    bomb.write_bytes(_many_zeros(300).getvalue())
    with pytest.raises(ArchiveTooLargeError, match="300 entries"):
        collect_reference_files([bomb], tmp_path / "work", limits=ArchiveLimits.from_settings(Settings()))
    strict = ArchiveLimits.from_settings(Settings(service={"max_archive_entries": 2}))
    small = tmp_path / "small.zip"
    small.write_bytes(_zip({"a.png": b"1", "b.png": b"2", "c.png": b"3"}).getvalue())
    with pytest.raises(ArchiveTooLargeError, match="3 entries; the limit is 2"):
        collect_reference_files([small], tmp_path / "work", limits=strict)
    assert not (tmp_path / "work").exists()
