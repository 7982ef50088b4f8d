"""The agent's kept file-system answers (ember.agent.fscache): real inotify, real directories."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ember.agent.fscache import MAX_ANSWERS, FsCache, ancestors


class Asked:
    """A compute function that counts its calls and answers whether ``path`` exists."""

    def __init__(self, path: Path, keep: bool = True) -> None:
        self.path, self.keep, self.calls = path, keep, 0

    def __call__(self) -> tuple[bool, bool]:
        self.calls += 1
        return self.path.exists(), self.keep


@pytest.fixture
def cache() -> FsCache:
    fs = FsCache()
    assert fs.works, "inotify is not available on this host"
    return fs


def test_ancestors_run_up_to_the_root() -> None:
    assert ancestors("/usr/local/bin/") == ["/usr/local/bin", "/usr/local", "/usr", "/"]
    assert ancestors("/") == ["/"]


def test_an_answer_is_kept_until_its_directory_changes(cache: FsCache, tmp_path: Path) -> None:
    target = tmp_path / "pyvenv.cfg"
    ask = Asked(target)
    assert cache.get("venv", [str(tmp_path)], ask) is False
    assert cache.get("venv", [str(tmp_path)], ask) is False
    assert ask.calls == 1  # the second answer was the kept one
    target.write_text("home = /usr\n")
    assert cache.get("venv", [str(tmp_path)], ask) is True  # the creation dropped it
    assert ask.calls == 2


@pytest.mark.parametrize("change", ["chmod", "rename", "delete"])
def test_changes_to_a_child_drop_the_answers(cache: FsCache, tmp_path: Path, change: str) -> None:
    child = tmp_path / "python3"
    child.write_text("")
    ask = Asked(child)
    cache.get("k", [str(tmp_path)], ask)
    if change == "chmod":
        child.chmod(0o755)
    elif change == "rename":
        child.rename(tmp_path / "python3.old")
    else:
        child.unlink()
    cache.get("k", [str(tmp_path)], ask)
    assert ask.calls == 2


def test_a_directory_that_does_not_exist_yet_is_watched_through_its_parent(
    cache: FsCache, tmp_path: Path
) -> None:
    missing = tmp_path / "local" / "bin"
    ask = Asked(missing / "python3")
    assert cache.get("k", [str(missing)], ask) is False
    missing.mkdir(parents=True)
    (missing / "python3").write_text("")
    assert cache.get("k", [str(missing)], ask) is True
    assert ask.calls == 2


def test_replacing_an_ancestor_drops_the_answers(cache: FsCache, tmp_path: Path) -> None:
    deep = tmp_path / "usr" / "bin"
    deep.mkdir(parents=True)
    ask = Asked(deep / "python3")
    cache.get("k", [str(deep)], ask)
    os.rename(tmp_path / "usr", tmp_path / "usr.old")  # seen by the watch on tmp_path
    (tmp_path / "usr" / "bin").mkdir(parents=True)
    (tmp_path / "usr" / "bin" / "python3").write_text("")
    assert cache.get("k", [str(deep)], ask) is True
    assert ask.calls == 2


def test_an_answer_that_may_not_be_kept_is_computed_every_time(
    cache: FsCache, tmp_path: Path
) -> None:
    ask = Asked(tmp_path / "x", keep=False)
    for _ in range(3):
        cache.get("k", [str(tmp_path)], ask)
    assert ask.calls == 3


def test_the_number_of_answers_is_bounded(cache: FsCache, tmp_path: Path) -> None:
    ask = Asked(tmp_path / "x")
    for key in range(MAX_ANSWERS + 5):
        cache.get(key, [str(tmp_path)], ask)
    assert len(cache._answers) <= MAX_ANSWERS
    cache.close()
    assert not cache.works
    assert cache.get("after", [str(tmp_path)], ask) is False  # closed: computed, not kept
