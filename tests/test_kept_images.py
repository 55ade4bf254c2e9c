"""Kept inspected images: off by default, content-addressed, pruned by count and age, never through a link."""

from __future__ import annotations

import hashlib
import io
import os
import time

import numpy as np
import pytest
from PIL import Image

from eagle.kept_images import KEPT_DIR, KeptImageError, KeptImages, keep_inspected_image
from eagle.settings import Settings, load_settings

DAY = 86_400.0


def png(level: int, size: int = 8) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), level, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def store(tmp_path, **limits) -> KeptImages:
    return KeptImages(tmp_path / KEPT_DIR, max_pixels=64_000_000, **{"max_count": 100, "max_days": 30.0, **limits})


def test_keeping_is_off_by_default_and_keeps_nothing(tmp_path, monkeypatch):
    settings = Settings(data_dir=tmp_path)
    assert settings.keep_images.enabled is False and settings.keep_images.auto_refresh is False
    data = png(10)
    assert keep_inspected_image(settings, sha(data), data) is False
    assert not (tmp_path / KEPT_DIR).exists()
    assert keep_inspected_image(None, sha(data), data) is False


def test_the_settings_come_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("EAGLE_KEEP_IMAGES__ENABLED", "true")
    monkeypatch.setenv("EAGLE_KEEP_IMAGES__MAX_COUNT", "7")
    monkeypatch.setenv("EAGLE_KEEP_IMAGES__MAX_DAYS", "2.5")
    monkeypatch.setenv("EAGLE_KEEP_IMAGES__AUTO_REFRESH", "true")
    settings = load_settings(data_dir=tmp_path)
    keep = settings.keep_images
    assert (keep.enabled, keep.max_count, keep.max_days, keep.auto_refresh) == (True, 7, 2.5, True)
    kept = KeptImages.of(settings)
    assert kept.root == tmp_path / KEPT_DIR and kept.max_count == 7 and kept.max_days == 2.5
    monkeypatch.setenv("EAGLE_KEEP_IMAGES__MAX_COUNT", "0")
    with pytest.raises(ValueError, match="EAGLE_KEEP_IMAGES__MAX_COUNT"):
        load_settings(data_dir=tmp_path)


def test_an_enabled_setting_keeps_the_bytes_by_sha256_and_reads_them_back(tmp_path):
    settings = Settings(data_dir=tmp_path, keep_images={"enabled": True})
    data = png(20)
    assert keep_inspected_image(settings, sha(data), data) is True
    kept = KeptImages.of(settings)
    assert kept.path(sha(data)) == tmp_path / KEPT_DIR / f"{sha(data)}.img"
    assert kept.has(sha(data)) and kept.read(sha(data)) == data
    source = tmp_path / "part.png"
    source.write_bytes(png(30))
    assert keep_inspected_image(settings, sha(png(30)), source) is True
    assert sorted(s for s, _ in kept.list()) == sorted([sha(data), sha(png(30))])
    assert keep_inspected_image(settings, sha(data), png(21)) is False  # bytes of another image: refused, logged


def test_retention_by_count_keeps_the_newest(tmp_path):
    kept = store(tmp_path, max_count=3)
    now = time.time()
    images = [png(level) for level in range(5)]
    for i, data in enumerate(images):
        kept.keep(sha(data), data, now=now + i)
    assert [s for s, _ in kept.list()] == [sha(d) for d in reversed(images[2:])]
    kept.keep(sha(images[2]), images[2], now=now + 10)  # seen again: its age restarts, the oldest other goes
    kept.keep(sha(images[0]), images[0], now=now + 11)
    assert [s for s, _ in kept.list()] == [sha(images[0]), sha(images[2]), sha(images[4])]


def test_retention_by_days_deletes_the_old_ones_on_each_write(tmp_path):
    kept = store(tmp_path, max_days=2)
    now = time.time()
    old, recent, new = png(1), png(2), png(3)
    kept.keep(sha(old), old, now=now - 3.5 * DAY)
    assert kept.has(sha(old))
    kept.keep(sha(recent), recent, now=now - 1 * DAY)
    assert not kept.has(sha(old)) and kept.has(sha(recent))  # 2.5 days older than the second write: pruned by it
    assert kept.prune(now=now + 1.5 * DAY) == [sha(recent)]
    kept.keep(sha(new), new, now=now)
    assert [s for s, _ in kept.list()] == [sha(new)]


def test_links_are_refused_never_followed(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    data = png(40)
    # the kept folder itself a link: refused for writing and reading
    (tmp_path / "a").mkdir()
    os.symlink(outside, tmp_path / "a" / KEPT_DIR)
    linked = KeptImages(tmp_path / "a" / KEPT_DIR, max_count=10, max_days=1, max_pixels=10**8)
    with pytest.raises(KeptImageError, match="symbolic link"):
        linked.keep(sha(data), data)
    assert not linked.has(sha(data)) and list(outside.iterdir()) == []
    settings = Settings(data_dir=tmp_path / "a", keep_images={"enabled": True})
    assert keep_inspected_image(settings, sha(data), data) is False and list(outside.iterdir()) == []

    # an entry that is a link to a valid image elsewhere: not kept, not read, and a write replaces the link
    kept = store(tmp_path)
    kept.keep(sha(png(41)), png(41))
    target = outside / "x.png"
    target.write_bytes(data)
    os.symlink(target, kept.path(sha(data)))
    assert not kept.has(sha(data)) and sha(data) not in [s for s, _ in kept.list()]
    with pytest.raises(KeptImageError):
        kept.read(sha(data))
    kept.keep(sha(data), data)
    assert not kept.path(sha(data)).is_symlink() and kept.read(sha(data)) == data and target.read_bytes() == data

    # a source path that is a link is not read either
    os.symlink(target, tmp_path / "link.png")
    assert (
        keep_inspected_image(
            Settings(data_dir=tmp_path, keep_images={"enabled": True}), sha(data), tmp_path / "link.png"
        )
        is False
    )


def test_reading_back_checks_the_hash_and_decodes_again(tmp_path):
    kept = store(tmp_path)
    data = png(50)
    kept.keep(sha(data), data)
    kept.path(sha(data)).write_bytes(png(51))
    with pytest.raises(KeptImageError, match="altered"):
        kept.read(sha(data))
    text = b"not an image at all"
    kept.path(sha(text)).write_bytes(text)
    with pytest.raises(KeptImageError):
        kept.read(sha(text))
    with pytest.raises(KeptImageError, match="not a sha256"):
        kept.path("../../etc/passwd")


def test_writes_are_atomic_no_partial_file_is_left(tmp_path, monkeypatch):
    from common import atomic

    kept = store(tmp_path)
    data = png(60)

    def broken_replace(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(atomic.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk gone"):
        kept.keep(sha(data), data)
    monkeypatch.undo()
    assert list((tmp_path / KEPT_DIR).iterdir()) == []
    assert kept.keep(sha(data), data) and kept.read(sha(data)) == data


def test_kept_pictures_are_readable_by_the_owner_alone_whatever_the_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        kept = store(tmp_path)
        data = png(40)
        assert kept.keep(sha(data), data)
    finally:
        os.umask(previous)
    assert (tmp_path / KEPT_DIR).stat().st_mode & 0o777 == 0o700
    assert kept.path(sha(data)).stat().st_mode & 0o777 == 0o600


def test_retention_still_holds_when_keeping_was_turned_off(tmp_path):
    """Proposing a refresh prunes (eagle.bank_refresh.propose_for): old pictures go even when nothing new is kept."""
    kept = store(tmp_path, max_days=1.0)
    data = png(50)
    kept.keep(sha(data), data, now=time.time() - 3 * DAY)
    assert kept.has(sha(data))  # kept three days ago
    assert kept.prune() == [sha(data)] and not kept.has(sha(data))
