"""keymemo: a key is made again exactly when a file or directory it watches has changed."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from ember.images import keymemo


class Maker:
    """Counts its calls; the key it makes names the files' current contents."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        return ",".join(f"{p.name}={p.read_text()}" for p in sorted(self.root.rglob("*.py")))


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    (tmp_path / "agent").mkdir()
    (tmp_path / "agent" / "a.py").write_text("one")
    (tmp_path / "ring.py").write_text("ring")
    return tmp_path


def _key(tree: Path, make: Callable[[], str]) -> str:
    watched = keymemo.tree([tree / "agent", tree / "ring.py"], ".py")
    return keymemo.key(("test", str(tree)), watched, make)


def test_an_unchanged_tree_reuses_the_key(tree: Path) -> None:
    make = Maker(tree)
    first = _key(tree, make)
    assert _key(tree, make) == first
    (tree / "notes.py").write_text("outside what is watched")
    assert _key(tree, make) == first
    assert make.calls == 1


def test_an_edit_of_the_same_size_is_seen(tree: Path) -> None:
    make = Maker(tree)
    first = _key(tree, make)
    path = tree / "agent" / "a.py"
    before = path.stat()
    path.write_text("two")  # same size, same inode
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))  # even with mtime put back
    assert _key(tree, make) == "a.py=two,ring.py=ring" != first
    assert make.calls == 2


def test_added_removed_and_nested_files_are_seen(tree: Path) -> None:
    make = Maker(tree)
    _key(tree, make)
    (tree / "agent" / "b.py").write_text("new")
    assert "b.py=new" in _key(tree, make)
    (tree / "agent" / "sub").mkdir()
    (tree / "agent" / "sub" / "c.py").write_text("deep")
    assert "c.py=deep" in _key(tree, make)
    (tree / "agent" / "sub" / "c.py").write_text("deeper")
    assert "c.py=deeper" in _key(tree, make)
    (tree / "agent" / "b.py").unlink()
    assert "b.py" not in _key(tree, make)
    assert make.calls == 5


def test_pycache_is_not_watched(tree: Path) -> None:
    assert not any("__pycache__" in p for p in keymemo.tree([tree / "agent"], ".py"))
    (tree / "agent" / "__pycache__").mkdir()
    (tree / "agent" / "__pycache__" / "a.cpython-311.py").write_text("compiled")
    assert not any("__pycache__" in p for p in keymemo.tree([tree / "agent"], ".py"))


def test_a_failure_is_not_remembered(tree: Path) -> None:
    def broken() -> str:
        raise OSError("the tarball is missing")

    with pytest.raises(OSError):
        _key(tree, broken)
    make = Maker(tree)
    assert _key(tree, make) == "a.py=one,ring.py=ring"
    assert make.calls == 1


def test_without_plain_files_every_call_makes_the_key() -> None:
    calls: list[int] = []
    for _ in range(2):
        keymemo.key(("test", "zip"), None, lambda: str(calls.append(1)))
    assert len(calls) == 2


def test_the_listing_is_walked_again_only_when_a_directory_changed(
    tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    walks: list[str] = []
    real_walk = os.walk

    def counted(top: str) -> object:
        walks.append(top)
        return real_walk(top)

    monkeypatch.setattr(keymemo.os, "walk", counted)
    roots = [tree / "agent", tree / "ring.py"]
    first = keymemo.tree(roots, ".py")
    assert keymemo.tree(roots, ".py") == first and len(walks) == 2  # kept: no walk
    (tree / "agent" / "a.py").write_text("edited")  # a file's edit: key() sees its stamp
    assert keymemo.tree(roots, ".py") == first and len(walks) == 2
    (tree / "agent" / "new.py").write_text("x")  # an entry added: its directory changed
    assert str(tree / "agent" / "new.py") in keymemo.tree(roots, ".py") and len(walks) == 4
    (tree / "later").mkdir()  # a root that was missing, made since
    (tree / "later" / "z.py").write_text("z")
    missing = [tree / "later-not-yet"]
    assert keymemo.tree(missing, ".py") == [str(missing[0])]
    (tree / "later").rename(missing[0])
    assert str(missing[0] / "z.py") in keymemo.tree(missing, ".py")
