"""The MICROCLF_* environment variables: declared once in core/settings.py, listed in the
README, read at call time, and a bad number said in one line."""

import re
from pathlib import Path

import pytest

from napari_microclf.core import settings
from napari_microclf.core.engine import EngineError, resolve_engine
from napari_microclf.core.errors import MicroclfError, SettingError
from napari_microclf.core.features import cache_max_bytes, memmap_threshold_bytes
from napari_microclf.core.pipeline import page_memory_budget

ROOT = Path(__file__).resolve().parents[1]
DECLARED = {v.name for v in settings.DECLARED}


def test_the_readme_table_lists_exactly_the_declared_variables():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("### Environment variables", 1)[1].split("\n#", 1)[0]
    listed = re.findall(r"^\| `(MICROCLF_\w+)` \|", section, flags=re.M)
    assert sorted(listed) == sorted(DECLARED)
    assert len(listed) == len(set(listed))


def test_every_variable_the_code_names_is_declared_and_read_through_settings():
    sources = [*(ROOT / "src").rglob("*.py"), *(ROOT / "scripts").glob("*")]
    named = set()
    for path in sources:
        text = path.read_text(encoding="utf-8")
        named |= set(re.findall(r"MICROCLF_[A-Z0-9_]*[A-Z0-9]", text))
        if path.name != "settings.py":  # only settings.py reads them from the environment
            assert not re.search(r"environ[^\n]*[\"']MICROCLF_", text), path
    assert named == DECLARED


def test_numbers_are_read_at_each_call(monkeypatch):
    monkeypatch.delenv("MICROCLF_MEMMAP_MB", raising=False)
    assert settings.memmap_mb() == 256 and memmap_threshold_bytes() == 256 * 2**20
    monkeypatch.setenv("MICROCLF_MEMMAP_MB", "0.5")
    assert memmap_threshold_bytes() == 2**19
    monkeypatch.setenv("MICROCLF_CACHE_MAX_GB", " ")  # blank: unset
    assert cache_max_bytes() == 10 * 2**30
    monkeypatch.setenv("MICROCLF_PAGE_MEMORY_MB", "-5")  # below 0: no page kept
    assert page_memory_budget() == 0
    monkeypatch.setenv("MICROCLF_PAGE_MEMORY_MB", "2")
    assert page_memory_budget() == 2 * 2**20


@pytest.mark.parametrize("value", ["ten", "1e400", "nan"])
def test_a_number_that_is_not_one_is_a_one_line_error(monkeypatch, value):
    monkeypatch.setenv("MICROCLF_CACHE_MAX_GB", value)
    with pytest.raises(SettingError) as err:
        cache_max_bytes()
    message = str(err.value)
    assert "\n" not in message and "$MICROCLF_CACHE_MAX_GB" in message and repr(value) in message
    assert isinstance(err.value, MicroclfError) and isinstance(err.value, ValueError)


def test_flags_paths_and_the_engine(monkeypatch, tmp_path):
    for value, on in [("", False), (" ", False), ("0", False), ("1", True), ("yes", True)]:
        monkeypatch.setenv("MICROCLF_OFFLINE", value)
        assert settings.offline() is on
    monkeypatch.setenv("MICROCLF_CACHE", str(tmp_path / "zips"))
    assert settings.bundle_cache() == tmp_path / "zips"
    monkeypatch.delenv("MICROCLF_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert settings.bundle_cache() == tmp_path / "xdg" / "napari-microclf" / "bundles"
    monkeypatch.setenv("MICROCLF_ENGINE", "tensorflow")
    assert resolve_engine("auto") == "tensorflow"
    monkeypatch.setenv("MICROCLF_ENGINE", "cuda")  # said as an unknown engine, as before
    with pytest.raises(EngineError, match="unknown engine 'cuda'"):
        resolve_engine("auto")
