"""Name confinement in service.paths, without a server."""

import pytest

from service.errors import InvalidNameError
from service.paths import Root, ensure_layout, entry_names, resolve_name


@pytest.fixture
def layout(tmp_path):
    data_dir = tmp_path / "data"
    ensure_layout(data_dir)
    (data_dir / "base" / "model-a").mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    return data_dir, outside


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("", "is empty"),
        ("/etc", "absolute path"),
        ("..", "contains '..'"),
        ("../merged", "contains '..'"),
        ("a/../b", "contains '..'"),
        ("a/b", "path separator"),
        ("a\\b", "path separator"),
        (".hidden", "starts with '.'"),
        ("bad name", "characters other than"),
        ("x" * 129, "maximum is 128"),
    ],
)
def test_resolve_name_rejects(layout, name, reason):
    data_dir, _ = layout
    with pytest.raises(InvalidNameError, match=reason) as raised:
        resolve_name(data_dir, Root.BASE, name)
    assert raised.value.status_code == 400


def test_resolve_name_accepts_plain_names(layout):
    data_dir, _ = layout
    root_dir = (data_dir / "base").resolve()

    assert resolve_name(data_dir, Root.BASE, "model-a") == root_dir / "model-a"
    assert resolve_name(data_dir, Root.BASE, "not-yet.v1_2") == root_dir / "not-yet.v1_2"


def test_symlink_outside_root_rejected(layout):
    data_dir, outside = layout
    (data_dir / "base" / "escape").symlink_to(outside)
    (data_dir / "merged" / "dangling").symlink_to(outside / "missing")

    with pytest.raises(InvalidNameError, match="resolves outside base/"):
        resolve_name(data_dir, Root.BASE, "escape")
    with pytest.raises(InvalidNameError, match="resolves outside merged/"):
        resolve_name(data_dir, Root.MERGED, "dangling")


def test_symlink_to_root_itself_rejected(layout):
    data_dir, _ = layout
    (data_dir / "adapters" / "loop").symlink_to(data_dir / "adapters")

    with pytest.raises(InvalidNameError, match="resolves outside adapters/"):
        resolve_name(data_dir, Root.ADAPTERS, "loop")


def test_symlink_inside_root_allowed(layout):
    data_dir, _ = layout
    (data_dir / "base" / "alias").symlink_to(data_dir / "base" / "model-a")

    path = resolve_name(data_dir, Root.BASE, "alias")

    assert path.resolve() == (data_dir / "base" / "model-a").resolve()


def test_entry_names_skip_hidden_and_escaping(layout):
    data_dir, outside = layout
    (data_dir / "base" / ".model-b.x1.tmp").mkdir()
    (data_dir / "base" / "escape").symlink_to(outside)
    (data_dir / "base" / "alias").symlink_to(data_dir / "base" / "model-a")

    assert entry_names(data_dir, Root.BASE) == ["alias", "model-a"]
